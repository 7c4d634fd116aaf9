"""DDP training on the CPU (gloo, 2 processes): the token-sparse families under torchrun and -num_gpus, a rank that
dies or hangs, --c with another number of processes, and one DDP step of the U-Net, UNETR and STP+MTA against one
single-process step.

Select them with `pytest -k "ddp or distributed or torchrun"`.
"""
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import psutil
import pytest
import torch

from conftest import BIN, CONFIG, DATASET

FOLD = "0"
TIMEOUT_S = 20  # the collective timeout of the hang case (nnScd_ddp_timeout_s)
HANG_MESSAGE = f"the other ranks did not answer within {TIMEOUT_S} s"


def _launch(trainer: str, launcher: str, extra: List[str] = ()) -> List[str]:
    args = [str(BIN / "nnScd_train"), DATASET, CONFIG, FOLD, "-tr", trainer, "-device", "cpu", *extra]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *args]
    return [*args, "-num_gpus", "2"] if launcher == "num_gpus" else args


def _worker_pid(launcher_pid: int, rank: int) -> int:
    """The process of `rank` among the launcher's children (torchrun's workers carry RANK in their environment)."""
    for child in psutil.Process(launcher_pid).children():
        with contextlib.suppress(psutil.Error):  # the process ended while being read
            if child.environ().get("RANK") == str(rank):
                return child.pid
    raise AssertionError(f"no worker of rank {rank} under process {launcher_pid}")


def _processes_of(trainer: str, results: str) -> List[int]:
    """The processes training `trainer` into `results` (nnUNet_results), their forked workers included."""
    pids = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # ended while being read, or not ours to read
            if trainer in process.cmdline() and process.environ().get("nnUNet_results") == results:
                pids.append(process.pid)
    return pids


def _wait_until(done: Callable[[], bool], what: str, limit_s: float, proc: Optional[subprocess.Popen] = None) -> None:
    """Poll `done` until it holds; fail if `proc` (the job) ends first or `limit_s` passes."""
    start = time.monotonic()
    while not done():
        assert proc is None or proc.poll() is None, f"the job ended before {what}"
        assert time.monotonic() - start < limit_s, f"no {what} after {limit_s} s"
        time.sleep(0.05)


def _ended(pid: int) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return True


def _log_epochs(fold_folder: Path) -> List[List[int]]:
    """The epochs each training log of the fold ran, oldest log first."""
    return [[int(line.rsplit("Epoch ", 1)[1]) for line in log.read_text().splitlines()
             if line.rstrip()[-1:].isdigit() and ": Epoch " in line]
            for log in sorted(fold_folder.glob("training_log_*.txt"))]


# (trainer, launcher of the first run, how one rank fails mid-training, launcher of the --c rerun)
# (nnU-Net's U-Net and UNETR train under DDP in the step test below; -num_gpus with --c is the -num_gpus start)
CASES = [("STPMTATrainer_smoke", "num_gpus", "hangs", "torchrun"),
         ("APFormerTrainer_smoke", "torchrun", "killed", "single")]


@pytest.mark.parametrize("trainer, launcher, failure, resume_launcher", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-resume_{c[3]}" for c in CASES])
def test_ddp_rank_failure_ends_job_and_torchrun_resume_finishes(nnunet_env, planned_dataset, tmp_path, trainer: str,
                                                               launcher: str, failure: str, resume_launcher: str):
    """Two processes train; one rank is killed (or stopped) right after the first epoch's checkpoint: the job ends
    non-zero within a bounded time naming the rank, and --c (with 1 or 2 processes) resumes at epoch 1, trains
    under DDP, writes checkpoint_final and validates every validation case, split over the ranks."""
    env = {**nnunet_env, "nnScd_ddp_timeout_s": str(TIMEOUT_S)}
    fold_folder = Path(env["nnUNet_results"]) / DATASET / f"{trainer}__nnUNetPlans__{CONFIG}" / f"fold_{FOLD}"
    log = tmp_path / "failed_run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_launch(trainer, launcher), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until((fold_folder / "checkpoint_latest.pth").exists, "checkpoint_latest.pth", 300, proc)
        rank_0, rank_1 = _worker_pid(proc.pid, 0), _worker_pid(proc.pid, 1)
        os.kill(rank_1, signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        failed_at = time.monotonic()
        if failure == "hangs":
            # Once rank 0 gave up and ended, rank 1 takes signals again (torchrun's pending SIGTERM ends it), as a rank
            # stuck in a loop or on a lock does; a frozen one would only add torchrun's fixed 30 s before its SIGKILL.
            _wait_until(lambda: HANG_MESSAGE in log.read_text(), repr(HANG_MESSAGE), TIMEOUT_S + 60, proc)
            _wait_until(lambda: _ended(rank_0), "end of rank 0 after its message", 15)
            os.kill(rank_1, signal.SIGCONT)
        proc.wait(timeout=TIMEOUT_S + 90)
        ended_after = time.monotonic() - failed_at
        deadline = time.monotonic() + 10  # the augmentation workers of every rank end with their rank
        while _processes_of(trainer, env["nnUNet_results"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _processes_of(trainer, env["nnUNet_results"])
    finally:
        for pid in _processes_of(trainer, env["nnUNet_results"]):  # never leave a failed test's processes behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output = log.read_text()
    assert not left, f"processes of the failed job outlived it: {left}"
    assert proc.returncode != 0, output[-4000:]
    if failure == "killed":  # torchrun sees the worker die and stops the others at once
        assert ended_after < 30, f"the job took {ended_after:.0f} s to end after rank 1 was killed"
        assert "local_rank: 1" in output and "Signal 9 (SIGKILL)" in output, output[-4000:]
    else:  # rank 0 waits one collective timeout, names itself and the fix, and ends; torchrun ends rank 1
        assert ended_after < TIMEOUT_S + 30, f"the job took {ended_after:.0f} s to end after rank 1 hung"
        assert f"rank 0 of 2: {HANG_MESSAGE}" in output and "rank 1 of 2:" not in output, output[-4000:]
        assert "rerun with --c" in output
    assert not (fold_folder / "checkpoint_final.pth").exists()

    resumed = subprocess.run(_launch(trainer, resume_launcher, ["--c"]), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert _log_epochs(fold_folder)[-1] == [1], "the --c run did not resume at epoch 1"
    checkpoint = torch.load(fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2  # the smoke schedule's epochs, all done
    summary = json.loads((fold_folder / "validation" / "summary.json").read_text())
    split = json.loads((Path(env["nnUNet_preprocessed"]) / DATASET / "splits_final.json").read_text())[int(FOLD)]
    assert sorted(Path(c["prediction_file"]).name.split(".")[0] for c in summary["metric_per_case"]) == \
        sorted(split["val"])
    assert not list(fold_folder.glob(".*partial*")) and not list((fold_folder / "validation").glob(".*partial*"))


def test_torchrun_refuses_num_gpus_and_nnunet_trainers_on_cpu(nnunet_env, planned_dataset):
    """What cannot work is refused before any training starts, with the fix."""
    env = {**nnunet_env, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    from conftest import run_command

    double = run_command(["nnScd_train", DATASET, CONFIG, FOLD, "-tr", "nnScdTrainer_smoke", "-device", "cpu",
                          "-num_gpus", "2"], env, check=False, in_process=True)
    assert double.returncode == 2 and "Drop -num_gpus" in double.stderr
    own = run_command(["nnScd_train", DATASET, CONFIG, FOLD, "-tr", "nnUNetTrainer", "-device", "cpu"], env,
                      check=False, in_process=True)
    assert own.returncode == 2 and "nnScdTrainer" in own.stderr and "one node" in own.stderr


def _ddp_steps(rank: int, init_file: str, out: str, steps: Dict[str, int]) -> None:
    """One rank of the DDP step test: `steps[name]` train steps of each trainer on its half of a fixed global batch."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_default_dtype(torch.float64)  # as the single-process side: compare averaging, not rounding
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for name, count in steps.items():
            trainer = _trainer(name)
            network = trainer.network.module
            if rank == 0:
                torch.save(network.state_dict(), f"{out}/{name}_start.pt")
            losses = []
            for data, target in _global_batches(trainer, count, trainer.batch_size * 2):
                local = slice(rank * trainer.batch_size, (rank + 1) * trainer.batch_size)
                loss = trainer.train_step({"data": data[local], "target": [t[local] for t in target]
                                           if isinstance(target, list) else target[local]})["loss"]
                rank_losses = [None, None]
                torch.distributed.all_gather_object(rank_losses, float(loss))
                losses.append(sum(rank_losses) / 2)  # the global batch's loss, as nnU-Net logs it
                flat = torch.cat([p.detach().flatten() for p in network.parameters()])
                gathered = [torch.empty_like(flat) for _ in range(2)]
                torch.distributed.all_gather(gathered, flat)
                assert torch.equal(gathered[0], gathered[1]), f"{name}: ranks differ after a step"
            if rank == 0:
                torch.save({"state": network.state_dict(), "losses": losses, "grads": _gradients(network)},
                           f"{out}/{name}_ddp.pt")
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _trainer(name: str):
    """`name` on the synthetic dataset's 3d_fullres, fold 1, initialised on the CPU (DDP-wrapped under DDP)."""
    from nnscd.core.paths import settle_environment

    settle_environment(cpu=True)  # nnU-Net's trainer lookup finds nnscd's trainers
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(DATASET, CONFIG, 1, name, device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def _global_batches(trainer, steps: int, batch: int) -> List[tuple]:
    """Fixed images and label maps (deep-supervision pyramid where the trainer has one), the same on every rank."""
    generator = torch.Generator().manual_seed(0)
    patch, classes = trainer.configuration_manager.patch_size, len(trainer.label_manager.all_labels)
    batches = []
    for _ in range(steps):
        data = torch.randn(batch, trainer.num_input_channels, *patch, generator=generator)
        seg = torch.randint(0, classes, (batch, 1, *patch), generator=generator).float()
        target = [torch.nn.functional.interpolate(seg, scale_factor=[float(s) for s in scale], mode="nearest")
                  for scale in trainer._get_deep_supervision_scales()] if trainer.enable_deep_supervision else seg
        batches.append((data, target))
    return batches


def _gradients(network: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The gradients of the last step (nnU-Net zeroes them at the start of a step, not after it)."""
    return {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}


# one step of the deterministic networks, whose gradients must agree; a few of STP+MTA, whose ranks must agree
STEPS = {"nnScdTrainer_smoke": 1, "UNETRTrainer_smoke": 1, "STPMTATrainer_smoke": 3}


def test_ddp_step_equals_single_process_step(nnunet_env, planned_dataset, tmp_path):
    """U-Net and UNETR: a DDP step on halves of a global batch gives the loss, gradients and parameters of a
    single-process step on the whole batch. STP+MTA (random perturbations per rank): identical parameters on both
    ranks after every step, and a loss that tracks the single-process one."""
    torch.multiprocessing.start_processes(_ddp_steps, args=(str(tmp_path / "init"), str(tmp_path), STEPS),
                                          nprocs=2, start_method="spawn")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # fp32 sums in another order differ by more than DDP's averaging does
    try:
        _compare_with_single_process_steps(tmp_path)
    finally:
        torch.set_default_dtype(default_dtype)


def _compare_with_single_process_steps(tmp_path: Path) -> None:
    for name, count in STEPS.items():
        trainer = _trainer(name)
        trainer.network.load_state_dict(torch.load(tmp_path / f"{name}_start.pt"))
        losses = [float(trainer.train_step({"data": data, "target": target})["loss"])
                  for data, target in _global_batches(trainer, count, trainer.batch_size)]
        ddp = torch.load(tmp_path / f"{name}_ddp.pt")
        if name == "STPMTATrainer_smoke":
            assert ddp["losses"] == pytest.approx(losses, rel=0.1)
            continue
        assert ddp["losses"] == pytest.approx(losses, rel=1e-5)
        grads = _gradients(trainer.network)
        # nnU-Net weighs the U-Net's lowest output 0 alone and 1e-6 under DDP (which needs a gradient everywhere)
        assert set(ddp["grads"]) - set(grads) <= {"decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"}
        largest = max(float(g.abs().max()) for g in grads.values())
        for key, grad in grads.items():  # in float64 the two sides are 3e-16 (UNETR) and 7e-7 (U-Net, its 1e-6
            # weight above) of the largest gradient apart, in fp32 up to 1.2e-3 (summation order with cancellation);
            # gradients left on one rank or summed instead of averaged are 1e-0 apart
            torch.testing.assert_close(ddp["grads"][key], grad, rtol=1e-2, atol=1e-3 * largest,
                                       msg=lambda m: f"{name} gradient of {key}: {m}")
        for key, value in trainer.network.named_parameters():
            if key not in grads:
                continue
            # AdamW's first step moves each weight by lr x gradient / (|gradient| + eps): where a gradient is as
            # small as the noise above, that ratio is noise, so those weights are left out
            clear = grads[key].abs() > 1e-3 * largest
            torch.testing.assert_close(ddp["state"][key][clear], value.detach()[clear], rtol=1e-3, atol=1e-5,
                                       msg=lambda m: f"{name} {key}: {m}")

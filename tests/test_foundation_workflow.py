"""The nnU-Net workflow end to end through the nnScd_ console scripts, on the CPU, with Dice thresholds."""
import re
import shlex

from conftest import CONFIG, DATASET_ID, TRAINER, dice_per_class, mean_dice, run_command

MIN_DICE = 0.5  # the synthetic classes are found with Dice > 0.85 after the short schedule; 0.5 rules out luck


def test_two_folds_train_and_validate(trained_model):
    for fold in (0, 1):
        folder = trained_model / f"fold_{fold}"
        assert (folder / "checkpoint_final.pth").is_file()
        assert not (folder / "checkpoint_latest.pth").exists()  # removed once the final checkpoint exists
        assert list((folder / "validation").glob("*.npz")), "--npz must export validation probabilities"
        dice = mean_dice(folder / "validation" / "summary.json")
        assert min(dice.values()) >= MIN_DICE, dice


def test_predict_with_both_folds_ensembled_and_evaluate(nnunet_env, planned_dataset, trained_model, tmp_path):
    out = tmp_path / "pred"
    run_command(["nnScd_predict", "-i", str(planned_dataset / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                 "-c", CONFIG, "-tr", TRAINER, "-f", "0", "1", "-device", "cpu", "-npp", "0", "-nps", "0"],
                nnunet_env)
    cases = sorted(p.name for p in out.glob("*.nii.gz"))
    assert cases == sorted(p.name for p in (planned_dataset / "labelsTs").glob("*.nii.gz"))
    assert not list(out.glob(".partial_*"))
    run_command(["nnScd_evaluate_folder", str(planned_dataset / "labelsTs"), str(out),
                 "-djfile", str(trained_model / "dataset.json"), "-pfile", str(trained_model / "plans.json"),
                 "-np", "1"], nnunet_env)
    dice = mean_dice(out / "summary.json")
    assert set(dice) == {"1", "2"} and min(dice.values()) >= MIN_DICE, dice


def test_find_best_configuration_writes_runnable_nnscd_instructions(nnunet_env, planned_dataset, trained_model,
                                                                    tmp_path):
    proc = run_command(["nnScd_find_best_configuration", str(DATASET_ID), "-c", CONFIG, "-tr", TRAINER,
                        "-f", "0", "1", "-np", "1"], nnunet_env)
    assert "nnUNetv2_" not in proc.stdout
    instructions = (trained_model.parent / "inference_instructions.txt").read_text()
    assert "nnUNetv2_" not in instructions
    commands = [line for line in instructions.splitlines() if line.startswith("nnScd_")]
    assert [c.split()[0] for c in commands] == ["nnScd_predict", "nnScd_apply_postprocessing"]

    # run them as written, with the folders filled in
    folders = {"INPUT_FOLDER": str(planned_dataset / "imagesTs"), "OUTPUT_FOLDER_PP": str(tmp_path / "pp"),
               "OUTPUT_FOLDER": str(tmp_path / "pred")}
    for command in commands:
        command = re.sub("|".join(folders), lambda m: folders[m.group(0)], command)
        extra = ["-device", "cpu", "-npp", "0", "-nps", "0"] if command.startswith("nnScd_predict") else []
        run_command(shlex.split(command) + extra, nnunet_env)
    assert sorted(p.name for p in (tmp_path / "pp").glob("*.nii.gz")) == \
        sorted(p.name for p in (planned_dataset / "labelsTs").glob("*.nii.gz"))
    assert min(dice_per_class(tmp_path / "pp", planned_dataset / "labelsTs", [1, 2]).values()) >= MIN_DICE

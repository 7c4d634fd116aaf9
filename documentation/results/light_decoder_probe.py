"""Can a network fit ONE fixed Hippocampus batch (2 patches, fold 0's first training batch, nnScd_seed=0)?

The light-decoder ViT trained at the quality budget predicts background only; this separates "cannot optimise"
from "does not generalise". Plain torch: AdamW (lr 1e-3), cross-entropy - mean foreground soft Dice, 200 steps,
one thread; hard Dice per class on the same batch every 25 steps. Results: light_decoder_probe.txt.

    nnUNet_raw=... nnUNet_preprocessed=... nnScd_seed=0 nnUNet_n_proc_DA=0 \
        python documentation/results/light_decoder_probe.py VARIANT     # VARIANTS below
"""
import dataclasses
import os
import sys
import tempfile

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

import nnscd_trainers
from nnscd.networks.registry import CONFIGS, build_network
from nnscd.networks.token_sparse_vit import TokenSparseSegmenter

PATCH = (40, 56, 40)
VARIANTS = ("base", "unetr", "tok4", "heinit", "embedinit", "embedinit-heinit", "nopos", "convstem", "primus1small",
            "primus", "layerscale", "layerscale-heinit")


def network(variant: str) -> torch.nn.Module:
    from dynamic_network_architectures.architectures.primus import Primus
    from dynamic_network_architectures.building_blocks.patch_encode_decode import PatchEmbedDeeperControlled
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    if variant == "primus":  # nnU-Net's PrimusV3-S
        return build_network("primusv3-s", 1, 3, PATCH)
    if variant == "primus1small":  # the original Primus' one-conv stem + Eva blocks, at the small ViT's size
        return Primus(1, 192, (8, 8, 8), 3, 6, 4, PATCH, init_values=0.1, scale_attn_inner=True)
    config = CONFIGS["unetr" if variant == "unetr" else "vit-light"]
    if variant == "tok4":
        config = dataclasses.replace(config, token_size=4)
    if "layerscale" in variant:  # Primus' LayerScale 0.1 on the plain blocks
        config = dataclasses.replace(config, layer_scale=0.1)
    net = TokenSparseSegmenter(1, 3, PATCH, config)
    if variant == "convstem":
        net.patch_embed = PatchEmbedDeeperControlled(1, 192, (1, 1, 1), (16, 32, 64, 128))
    if "embedinit" in variant:
        net.patch_embed.apply(InitWeights_He(1e-2))
    if "nopos" in variant:
        net.pos.table.zero_()
    if "heinit" in variant:
        net.decoder.apply(InitWeights_He(1e-2))
    return net


def first_batch() -> tuple[torch.Tensor, torch.Tensor]:
    pre = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset004_Hippocampus")
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    os.environ["nnUNet_results"] = tempfile.mkdtemp()
    trainer = nnscd_trainers.ViTLightTrainer(plans, "3d_fullres", 0, load_json(os.path.join(pre, "dataset.json")),
                                             device=torch.device("cpu"))
    trainer.initialize()
    batch = next(trainer.get_dataloaders()[0])
    return batch["data"][:2], batch["target"][:2, 0].long()


def main() -> None:
    variant = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = first_batch()
    net = network(variant)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    onehot = torch.nn.functional.one_hot(y, 3).movedim(-1, 1).float()
    for step in range(1, 201):
        out = net(x)
        p = out.softmax(1)
        soft_dice = (2 * (p * onehot).sum((0, 2, 3, 4)) / (p.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4)) + 1e-5))
        loss = torch.nn.functional.cross_entropy(out, y) - soft_dice[1:].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            pred = out.argmax(1)
            dice = [float(2 * ((pred == c) & (y == c)).sum() / ((pred == c).sum() + (y == c).sum() + 1e-8))
                    for c in (1, 2)]
            print(variant, step, round(float(loss), 3), [round(d, 3) for d in dice], flush=True)


if __name__ == "__main__":
    main()

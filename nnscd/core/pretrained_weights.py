"""Warm starts across a dense network and its token-sparse twin: nnU-Net's `-pretrained_weights`, plus new modules.

nnunetv2's `load_pretrained_weights` demands every weight of the network (but segmentation layers) in the
checkpoint. A `TokenSparsePrimus` warm-started from a dense Primus fold (or an "infill" `TokenSparseSegmenter` from
a UNETR fold) holds all of the dense network's modules and adds scorers and MTA, which it names in `fresh_modules`;
this loader lets exactly those start fresh and says so. Any other network goes to nnU-Net's loader unchanged.
nnScd_train installs it for the run (nnscd.cli.nnunet_commands).
"""
from typing import Sequence

import torch
from torch import nn

from nnunetv2.run.load_pretrained_weights import load_pretrained_weights as nnunet_load_pretrained_weights
from nnscd.core.device import unwrap


def load_pretrained_weights(network: nn.Module, fname: str, verbose: bool = False) -> None:
    """nnU-Net's contract (same names, same shapes, else an error naming the file), with `fresh_modules` exempt."""
    module = unwrap(network)
    fresh: Sequence[str] = getattr(module, "fresh_modules", ())
    if not fresh:
        return nnunet_load_pretrained_weights(network, fname, verbose)
    pretrained = torch.load(fname, map_location="cpu", weights_only=False)["network_weights"]
    own = module.state_dict()
    foreign = [k for k in own if k not in pretrained and not k.startswith(tuple(fresh))]
    reshaped = [k for k in own if k in pretrained and own[k].shape != pretrained[k].shape]
    if foreign or reshaped:
        raise RuntimeError(
            f"-pretrained_weights {fname} does not fit {type(module).__name__}: "
            + (f"{len(foreign)} of its weights are missing (first: {foreign[:3]}); " if foreign else "")
            + (f"{len(reshaped)} have another shape (first: {reshaped[0]} {tuple(pretrained[reshaped[0]].shape)} "
               f"vs {tuple(own[reshaped[0]].shape)}); " if reshaped else "")
            + "pass a checkpoint of the dense twin trained with the same plans, configuration and dataset "
              "(e.g. nnUNet_PrimusV3S_Trainer for STPMTAPrimusV3STrainer, UNETRTrainer for STPMTATrainer)")
    loaded = {k: v for k, v in pretrained.items() if k in own}
    module.load_state_dict({**own, **loaded})
    starting = sorted(p.rstrip(".") for p in fresh if any(k.startswith(p) and k not in loaded for k in own))
    print(f"Loaded {len(loaded)} of {len(own)} tensors from {fname}; starting fresh: {', '.join(starting) or 'none'}")

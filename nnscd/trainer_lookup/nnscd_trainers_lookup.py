"""Shim read by nnU-Net's trainer lookup (nnUNet_extTrainer points at this folder).

nnunetv2 drops modules imported from an external folder out of sys.modules after the lookup, which would make
their classes unpicklable. The classes found here live in the installed `nnscd_trainers` package instead, so
checkpoints, spawn pools and DDP workers can still import them by their real module name.
"""
from nnscd_trainers import *  # noqa: F401,F403

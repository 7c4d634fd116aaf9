"""nnU-Net trainers of nnscd. Every class named in __all__ is found by `-tr NAME` in all nnScd_ commands."""
from nnscd_trainers.nnscd_trainer import nnScdTrainer, nnScdTrainer_cpu

__all__ = ["nnScdTrainer", "nnScdTrainer_cpu"]

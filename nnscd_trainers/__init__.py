"""nnU-Net trainers of nnscd, found by `-tr NAME` in all nnScd_ commands.

Every nnUNetTrainer subclass defined in a module of this package is exported here (and so seen by nnU-Net's
lookup through nnscd/trainer_lookup): a new trainer needs only its class. Left out: bases that cannot build a
network (nnU-Net's AbstractPrimus leaves `build_network_architecture` abstract).
"""
import importlib
import inspect
import pkgutil

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _trainers_of_package() -> dict:
    found = {}
    for info in pkgutil.iter_modules(__path__, f"{__name__}."):
        module = importlib.import_module(info.name)
        found.update({name: cls for name, cls in inspect.getmembers(module, inspect.isclass)
                      if issubclass(cls, nnUNetTrainer) and cls.__module__ == module.__name__
                      and not getattr(cls.build_network_architecture, "__isabstractmethod__", False)})
    return found


_TRAINERS = _trainers_of_package()
globals().update(_TRAINERS)
__all__ = sorted(_TRAINERS)

"""The layout's rules, checked on the source: imports point one way, nnU-Net's hooks still exist, trainers are found."""
import ast
import importlib
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nnscd", "nnscd_trainers", "dataset_conversion")
# layer of each part, lowest first: a module may import its own layer and those below, never one above
LAYERS = [("nnscd.networks",), ("nnscd.core",), ("nnscd_trainers", "dataset_conversion"), ("nnscd.checks",),
          ("nnscd.tools",), ("nnscd.cli",)]


def _modules() -> Dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _imports(name: str) -> Set[str]:
    """Every module a module imports, at the top or inside a function (a cycle through a late import is one too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _project_imports(name: str) -> Set[str]:
    return {m for m in _imports(name) if m in MODULES and m != name}


def _cycle() -> List[str]:
    graph = {name: _project_imports(name) for name in MODULES}
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(name: str) -> List[str]:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[name] = 2
        return []

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return []


def _layer(name: str) -> int:
    for level, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return level
    return -1  # the package roots (nnscd/__init__.py) and the trainer lookup shim that nnU-Net reads


def _upward() -> List[str]:
    return [f"{name} -> {target}" for name in MODULES if _layer(name) >= 0
            for target in _project_imports(name) if _layer(target) > _layer(name)]


def test_no_import_cycle_among_the_projects_modules():
    assert _cycle() == []


def test_a_cycle_is_found_when_there_is_one(monkeypatch):
    """The walker itself: two modules importing each other are reported."""
    real = _project_imports
    fake = {"nnscd.core.paths": {"nnscd.core.safe_io"}, "nnscd.core.safe_io": {"nnscd.core.paths"}}
    monkeypatch.setattr(__import__(__name__), "_project_imports", lambda n: fake.get(n, real(n)))
    assert set(_cycle()) == {"nnscd.core.paths", "nnscd.core.safe_io"}


def test_imports_point_down_the_layers(monkeypatch):
    assert _upward() == []
    real = _project_imports  # and the check itself: core importing a tool is reported
    monkeypatch.setattr(__import__(__name__), "_project_imports",
                        lambda n: real(n) | ({"nnscd.tools.demo"} if n == "nnscd.core.paths" else set()))
    assert _upward() == ["nnscd.core.paths -> nnscd.tools.demo"]


def test_networks_know_nothing_of_nnunet_and_production_code_no_mock():
    networks = [n for n in MODULES if n.startswith("nnscd.networks")]
    assert networks and not [n for n in networks if any(m.split(".")[0] == "nnunetv2" for m in _imports(n))]
    assert not [n for n in MODULES if any(m.startswith("unittest") for m in _imports(n))]


def test_experiment_drivers_live_outside_the_package():
    assert not [n for n in MODULES if "experiments" in n.split(".")]
    assert (ROOT / "documentation" / "experiments" / "hippocampus.py").is_file()


@pytest.mark.parametrize("module, attribute", __import__("nnscd.core.nnunet_hooks", fromlist=["HOOKED"]).HOOKED)
def test_every_hooked_nnunet_attribute_exists(module, attribute):
    """Fails when an nnunetv2 release renames or moves what nnscd's hooks swap (pinned range: pyproject.toml)."""
    assert hasattr(importlib.import_module(module), attribute), f"nnunetv2 has no {module}.{attribute} any more"


def test_what_the_hooks_rely_on_beyond_names():
    """preprocessor_for_default swaps a property (it calls its fget); add_log_series writes into the local logger's
    per-epoch dict, which nnU-Net's checkpoints store."""
    import inspect

    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    assert isinstance(inspect.getattr_static(ConfigurationManager, "preprocessor_class"), property)
    logger = MetaLogger(output_folder=None, resume=False)
    assert isinstance(logger.local_logger.my_fantastic_logging, dict)
    assert all(isinstance(v, list) for v in logger.local_logger.my_fantastic_logging.values())


def test_hooks_swap_and_restore():
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
    from nnscd.core import nnunet_hooks

    original = trainer_module.nnUNetPredictor
    with nnunet_hooks.trainer_predictor(dict):
        assert trainer_module.nnUNetPredictor is dict
    assert trainer_module.nnUNetPredictor is original


def test_every_trainer_class_is_found_without_a_list():
    """A class defined in any nnscd_trainers module is exported and found by `-tr NAME`."""
    import nnscd_trainers
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnscd.checks.trainer_names import find_trainer
    from nnscd.core.paths import settle_environment

    trainers = set()  # every trainer class each module defines, found here without the package's discovery
    for name in (n for n in MODULES if n.startswith("nnscd_trainers.")):
        module = importlib.import_module(name)
        trainers |= {node.name for node in ast.parse(MODULES[name].read_text()).body if isinstance(node, ast.ClassDef)
                     and issubclass(getattr(module, node.name), nnUNetTrainer)}
    assert {"STPMTATrainer", "STPMTAPrimusV3STrainer", "APFormerTrainer", "nnScdTrainer_budget"} <= trainers
    assert set(nnscd_trainers.__all__) == trainers - {"nnScdPrimusTrainer"}  # abstract: builds no network
    settle_environment()
    assert find_trainer("STPMTAPrimusLightTrainer_equalcompute").__module__ == "nnscd_trainers.primus_trainers"

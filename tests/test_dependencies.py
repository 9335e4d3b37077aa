"""pyproject.toml pins a tested range for every dependency, and this environment is inside it."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
CORE = {"torch", "torchvision", "transformers", "tokenizers", "safetensors", "accelerate", "deepspeed", "peft"}


def test_every_dependency_has_a_tested_range_holding_the_installed_version():
    requirements = [Requirement(line) for line in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]
    assert CORE <= {r.name for r in requirements}
    for requirement in requirements:
        operators = {spec.operator for spec in requirement.specifier}
        assert operators == {">=", "<"}, f"{requirement}: needs a lower and an upper bound"
        installed = version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), f"{requirement.name} {installed} is outside {requirement}"

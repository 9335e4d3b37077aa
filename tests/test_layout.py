"""The layout's rules, checked: the import contracts of ``pyproject.toml`` (no circle, library below
entry points), the library importable without any entry point, and files a reader can take in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("mpo.cli", "mpo.tools", "mpo.demo", "data_pipeline")


def test_import_contracts_hold():
    """``lint-imports`` (import-linter) keeps every contract: the layers, no circle at any depth, and
    a recipe read without the deep-learning stack. A broken one names the offending import."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", "pyproject.toml", "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_the_library_imports_no_entry_point():
    """``import mpo.data, mpo.model, mpo.train, mpo.losses`` loads no command module."""
    code = (
        "import sys, mpo.data, mpo.model, mpo.train, mpo.losses, mpo.data.dataset, mpo.data.layouts, mpo.model.forward, "
        "mpo.train.trainer; print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('mpo', 'data_pipeline')))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert "mpo.train.trainer" in loaded
    assert [m for m in loaded if m.startswith(ENTRY_POINTS) or m.endswith("__main__")] == []


def test_files_stay_under_500_lines():
    sizes = {path.relative_to(REPO): len(path.read_text().splitlines())
             for package in ("mpo", "data_pipeline") for path in (REPO / package).rglob("*.py")}
    assert {path: lines for path, lines in sizes.items() if lines >= 500} == {}

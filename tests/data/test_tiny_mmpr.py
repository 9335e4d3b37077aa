"""The example MMPR directory the CPU recipe trains on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def test_shipped_example_matches_its_generator(tiny_mmpr_dir):
    """examples/tiny_mmpr (the CPU recipe's data, committed) is write_tiny_mmpr(seed=0): same
    files, same JSON text, same pixels (PNG bytes may differ across zlib versions)."""
    shipped = Path(__file__).resolve().parents[2] / "examples" / "tiny_mmpr"
    files = sorted(p.relative_to(tiny_mmpr_dir) for p in tiny_mmpr_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
    assert len(files) == 1 + 4 + 10 + 12 + 24  # meta, annotations, shapes, multi, 3 clips x 8 frames
    for relative in files:
        if relative.suffix == ".png":
            np.testing.assert_array_equal(np.asarray(Image.open(shipped / relative)),
                                          np.asarray(Image.open(tiny_mmpr_dir / relative)), err_msg=str(relative))
        else:
            assert (shipped / relative).read_text() == (tiny_mmpr_dir / relative).read_text(), relative

"""A save that cannot be written: a real full filesystem (a 3 MiB tmpfs) and a real file-size limit
(RLIMIT_FSIZE) end the run in one line naming the path, the cause and the space, and leave no
``.tmp`` behind; the checkpoint before it stays loadable."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import subprocess
import sys

import pytest
from processes import RECIPE, REPO, last_line, run_env, train_overrides

from mpo.train.save_failures import SHORT_WRITE_REASON, human_bytes, io_reason


def _train(args: list[str], **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpo", "train", str(RECIPE), *args], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600, **popen)


def _leftovers(out) -> list[str]:
    return sorted(path.name for path in out.rglob("*") if ".tmp" in path.name)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 3 MiB tmpfs: room for one checkpoint of the tiny model (about 2.2 MB), not two."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}); the RLIMIT_FSIZE test covers the path")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_full_disk_during_a_checkpoint(tiny_model_dir, tiny_mmpr_dir, small_filesystem):
    """Old: `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 16000 vs 15892`
    after a 49-line traceback, no word of space or path, and step-00000004.tmp kept the space."""
    out = small_filesystem / "run"
    result = _train(train_overrides(tiny_model_dir, tiny_mmpr_dir, out, "train.max_steps=6", "train.save_every=2"))
    assert result.returncode == 1, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert re.fullmatch(
        rf"error: cannot write checkpoint {out}/checkpoints/step-00000004\.tmp: No space left on device "
        r"\((\d+ B|\d+\.\d KiB) free of 3\.0 MiB\); removed it, the checkpoints before it are intact: free space, then "
        r"resume with resume_from=latest", line), line
    assert "Traceback" not in result.stderr
    assert _leftovers(out) == [] and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())["step"] == 2


@pytest.mark.slow
def test_file_size_limit_during_a_checkpoint(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """RLIMIT_FSIZE of 256 KiB: the recipe, metrics and processor files fit, the 0.7 MB weights of
    the first checkpoint do not (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    out = tmp_path / "run"
    limit = 256 * 1024

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = _train(train_overrides(tiny_model_dir, tiny_mmpr_dir, out, "train.max_steps=4", "train.save_every=2"),
                    preexec_fn=limited)
    assert result.returncode == 1, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert re.fullmatch(rf"error: cannot write checkpoint {out}/checkpoints/step-00000002\.tmp: File too large "
                        r"\(\d+\.\d [KMGT]iB free of \d+\.\d [KMGT]iB\); removed it, the checkpoints before it are intact: "
                        r"free space, then resume with resume_from=latest", line), line
    assert _leftovers(out) == [] and not any((out / "checkpoints").iterdir())


def test_io_reason_reads_the_cause_through_the_chain():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        try:
            raise full
        except OSError as cause:
            raise RuntimeError("saving failed") from cause
    except RuntimeError as wrapped:
        assert io_reason(wrapped) == "No space left on device"
    assert io_reason(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 16000 vs 15892")) == SHORT_WRITE_REASON
    assert io_reason(RuntimeError('Error while serializing: IoError(Os { code: 27, kind: FileTooLarge, message: "File too large" })')) \
        == "File too large"
    assert io_reason(ValueError("a bug, not the disk")) is None
    assert [human_bytes(n) for n in (0, 1023, 1536, 3 << 20)] == ["0 B", "1023 B", "1.5 KiB", "3.0 MiB"]

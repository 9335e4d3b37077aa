"""The one atomic writer every output goes through, and the line-numbered JSONL reader."""

from __future__ import annotations

import os
import stat

import pytest

from mpo.errors import DataError
from mpo.jsonl import atomic_path, json_object_lines, write_json_atomic, write_jsonl_atomic, write_text_atomic


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl_atomic(target, [{"a": 1}, {"b": "é"}]) == 2
    assert target.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    write_json_atomic(target, {"x": [1, 2]})
    assert target.read_text() == '{\n  "x": [\n    1,\n    2\n  ]\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.jsonl"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_text_atomic(target, "old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_two_writers_of_one_path_never_share_a_temporary(tmp_path):
    target = tmp_path / "meta.json"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("1")
        second.write_text("2")
    assert target.read_text() == "1"  # the outer block ends last and wins, whole
    assert sorted(os.listdir(tmp_path)) == ["meta.json"]


def test_reader_numbers_lines_and_yields_bad_ones_as_errors(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\n[1]\n{"b": \n\xff\n')
    items = list(json_object_lines(path, "input file"))
    assert [number for number, _ in items] == [1, 3, 4, 5]
    assert items[0][1] == {"a": 1}
    assert [str(error) for _, error in items[1:]] == [
        f"{path}:3: <line>: expected a JSON object, got list",
        f"{path}:4: <line>: malformed JSON (Expecting value at column 7)",
        f"{path}:5: <line>: not UTF-8 (byte 0xff at column 1); re-encode the file as UTF-8",
    ]
    with pytest.raises(DataError, match="input file not found"):
        list(json_object_lines(tmp_path / "missing.jsonl", "input file"))

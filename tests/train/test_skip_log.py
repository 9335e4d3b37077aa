"""The skip report: each bad record listed once, across resumes and processes."""

from __future__ import annotations

import json

from mpo.errors import DataError


def test_skip_log_is_shared_by_processes(tmp_path):
    """Two processes' logs on one file (as under DDP): a record found by both is written once,
    each sees the other's entries, and a line torn by a kill is cut before the next write."""
    from mpo.train.skip_log import SkipLog

    first = SkipLog(tmp_path, start_over=True)
    second = SkipLog(tmp_path, start_over=False)
    error = lambda line: DataError("bad", file="a.jsonl", line=line, field="image")  # noqa: E731
    assert [e.line for e in first.add([error(1), error(2)])] == [1, 2]
    assert [e.line for e in second.add([error(2), error(3)])] == [3]
    assert first.refresh() == second.count == 3
    with open(tmp_path / "skipped.jsonl", "a") as handle:
        handle.write('{"file": "a.jsonl", "line": 4, "fie')
    third = SkipLog(tmp_path, start_over=False)
    assert [e.line for e in third.add([error(1), error(5)])] == [5]
    lines = (tmp_path / "skipped.jsonl").read_text().splitlines()
    assert [json.loads(x)["line"] for x in lines] == [1, 2, 3, 5]
    assert SkipLog(tmp_path, start_over=True).count == 0 and (tmp_path / "skipped.jsonl").read_text() == ""

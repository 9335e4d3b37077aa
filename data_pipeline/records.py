"""The pipeline's records: input questions, sample records, and the durable append log of a stage.

Atomic writes are :mod:`mpo.jsonl`'s (``write_jsonl_atomic``, ``write_json_atomic``).

Every error about input names the file, the 1-based line and the field (:class:`mpo.errors.DataError`),
so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mpo.errors import DataError
from mpo.jsonl import dumps_line, json_object_lines


class ResumeError(DataError):
    """An existing output cannot be continued (other settings, or another process writes it): one
    line and exit 2 from every command that reaches it (``mpo-data``, and ``mpo demo`` / ``mpo
    iterate``, which sample through the pipeline)."""


@dataclass(frozen=True)
class Question:
    """One input line: a question about zero or more images, with or without a checkable answer.

    ``answer`` is ``None`` for questions that only Dropout-NTP can use; a list means several
    acceptable answers (any of them counts).
    """

    id: str
    dataset: str
    images: tuple[str, ...]  # relative to the image root, as written in the input
    question: str
    answer: str | list[str] | None
    line: int  # 1-based line in ``file``; messages and ordering use it
    file: str


@dataclass
class ResponseJudgement:
    """The match stage's verdict on one response.

    ``status`` is ``correct``, ``incorrect``, ``unparsable`` (failed the format checks: a format
    negative) or ``unchecked`` (parsed, but the question has no ground truth). ``start``/``end``
    locate ``answer`` in the response, for the answer fix.
    """

    status: str
    answer: str | None
    start: int = -1
    end: int = -1
    score: float = 0.0
    mode: str | None = None
    error: str | None = None


@dataclass
class SampleRecord:
    """One question and its sampled responses: a sample-log line; with judgements, a matched.jsonl line."""

    id: str
    dataset: str
    line: int
    image: list[str]  # relative to the image root
    question: str  # as in the input
    prompt: str  # the CoT user turn sent to the model, with <image> placeholders
    answer: str | list[str] | None
    answer_format: str
    responses: list[str]
    finish_reasons: list[str]
    max_tiles: int | None = None  # the tile budget the responses were sampled with (absent in old logs)
    max_new_tokens: int | None = None  # the token limit they were sampled with (absent in old logs); Dropout-NTP's default
    system_prompt: str | None = None  # the system message sampled with (None: none; logs from before it was recorded)
    prompt_version: str | None = None  # the CoT template: v1, v2 or custom (None: logs from before it was recorded)
    modes: list[str] = field(default_factory=list)  # set by the match stage
    match_threshold: float | None = None  # set by the match stage: correct when the best score is above it
    judgements: list[ResponseJudgement] = field(default_factory=list)  # one per response, match stage

    @classmethod
    def from_json(cls, value: dict) -> SampleRecord:
        """Reads a log line (extra keys such as ``config`` are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"judgements"}
        judgements = [ResponseJudgement(**j) for j in value.get("judgements", [])]
        return cls(**{k: v for k, v in value.items() if k in names}, judgements=judgements)

    def to_json(self) -> dict:
        value = dataclasses.asdict(self)
        if not self.judgements:  # a sample-log line: not judged yet
            del value["modes"], value["match_threshold"], value["judgements"]
        return value


def split_skipped(lines: Iterable[dict]) -> tuple[list[SampleRecord], list[dict]]:
    """Sample-log lines -> sampled records, and the ``{"id", "line", "skipped"}`` lines of bad inputs."""
    records, skipped = [], []
    for value in lines:
        if "skipped" in value:
            skipped.append(value)
        else:
            records.append(SampleRecord.from_json(value))
    return records, skipped


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yields ``(line_number, object)`` for each non-blank line; a bad line raises DataError."""
    for number, value in json_object_lines(path, "file"):
        if isinstance(value, DataError):
            raise value
        yield number, value


def _parse_question(value: dict, *, path: str, line: int, default_dataset: str) -> Question:
    def fail(field: str, message: str) -> DataError:
        return DataError(message, file=path, line=line, field=field)

    if "image" in value and "images" in value:
        raise fail("image", "give either 'image' or 'images', not both")
    raw_images = value.get("image", value.get("images"))
    if raw_images is None or raw_images == "":
        images: tuple[str, ...] = ()
    elif isinstance(raw_images, str):
        images = (raw_images,)
    elif isinstance(raw_images, list) and raw_images and all(isinstance(x, str) and x for x in raw_images):
        images = tuple(raw_images)
    else:
        raise fail("image", "must be a path string or a non-empty list of path strings")
    question = value.get("question")
    if not isinstance(question, str) or not question.strip():
        raise fail("question", "missing or not a non-empty string")
    answer = value.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # a bare JSON number is a common way to write a numeric answer
    if isinstance(answer, str) and not answer.strip():
        answer = None  # an empty answer cannot be checked: the question goes to Dropout-NTP
    if isinstance(answer, list):
        answer = [str(x) for x in answer if isinstance(x, (str, int, float)) and str(x).strip()]
        if not answer:
            answer = None
    elif answer is not None and not isinstance(answer, str):
        raise fail("answer", f"must be a string, a number or a list of them, got {type(answer).__name__}")
    qid = value.get("id", str(line))
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or str(qid) == "":
        raise fail("id", "must be a non-empty string or an integer")
    dataset = value.get("dataset", default_dataset)
    if not isinstance(dataset, str) or not dataset or "/" in dataset:
        raise fail("dataset", "must be a non-empty name without '/'")
    return Question(str(qid), dataset, images, question, answer, line, path)


def read_questions(path: str | os.PathLike, default_dataset: str, skip_bad: bool) -> tuple[list[Question], list[DataError]]:
    """Reads the input JSONL. A bad line raises, or with ``skip_bad`` is returned in the second list.

    Lines without ``id`` are keyed by their line number, so sharding and resuming stay stable
    as long as the file does not change. Image paths are judged (the path rule, the files) by the
    sample stage, which knows the image root.
    """
    path = str(path)
    questions: list[Question] = []
    bad: list[DataError] = []
    seen: dict[str, int] = {}
    for number, value in json_object_lines(path, "input file"):
        try:
            if isinstance(value, DataError):
                raise value
            question = _parse_question(value, path=path, line=number, default_dataset=default_dataset)
            if question.id in seen:
                raise DataError(f"duplicate id {question.id!r} (first on line {seen[question.id]})", file=path, line=number, field="id")
        except DataError as error:
            if not skip_bad:
                raise
            bad.append(error)
            continue
        seen[question.id] = number
        questions.append(question)
    return questions, bad


class AppendLog:
    """The durable output of a generation stage: one JSON line per finished question.

    A run appends each finished batch as whole lines, then flushes and fsyncs, so a kill loses at
    most the batch in flight. On open, a torn last line (no newline: the kill hit mid-write) is cut
    off; every complete line is a finished question, and the stage skips those ids when it
    restarts. An advisory lock on the log itself stops two processes from appending to it (no
    lock file is left next to the outputs).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = None

    def __enter__(self) -> AppendLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: every write goes to the end, also after the torn tail is cut below.
        self._handle = open(self.path, "a", encoding="utf-8")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise ResumeError(f"{self.path} is being written by another process (lock held)") from None
        self._drop_torn_tail()
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.close()  # closing releases the lock

    def _drop_torn_tail(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
                handle.flush()
                os.fsync(handle.fileno())

    def read(self) -> list[dict]:
        """The complete lines written so far (call inside ``with``, after the torn tail is cut)."""
        return read_log(self.path)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self._handle.write("".join(dumps_line(record) for record in records))
        self._handle.flush()
        os.fsync(self._handle.fileno())


def read_log(path: str | os.PathLike) -> list[dict]:
    """Reads an append log, ignoring a torn last line (a run killed mid-write left it)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for number, text in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError as error:
            raise DataError(f"corrupt log line ({error.msg}); delete the file to start this stage over",
                            file=str(path), line=number) from None
    return records


class DirectoryLock:
    """An exclusive advisory lock (``flock``) on a directory, around a read-modify-write of files
    in it shared by several processes; locking the directory itself leaves no lock file behind."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = -1

    def __enter__(self) -> DirectoryLock:
        self.path.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDONLY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self._fd)  # closing releases the lock

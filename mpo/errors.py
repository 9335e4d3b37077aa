"""The one error type for bad user input (it names the file, the line and the field), and the
exit codes every command shares.

Exit codes, the same for mpo and mpo-data:

    0    done
    1    the job failed while running: a crash (its traceback is printed), a launched process
         that died, a model or server that failed, a run that produced nothing
    2    usage or bad input: an unknown command, flag or recipe key, a bad value, a bad data
         line; the last line says what to change
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

ERROR_DIR_ENV = "MPO_ERROR_DIR"
"""Set by ``mpo train --launch``: each training process writes its one-line error to
``<dir>/rank<N>.txt`` instead of the console, and the launcher prints it as its last line."""


class DataError(ValueError):
    """Bad input data or configuration, reported as ``file:line: field: message``.

    The CLI prints it as one line and exits non-zero (no traceback). With
    ``data.on_bad_sample: skip`` the trainer records it in ``skipped.jsonl`` instead.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = ":".join(str(x) for x in (file, line) if x is not None)
        prefix = f"{where}: " if where else ""
        prefix += f"{field}: " if field else ""
        super().__init__(prefix + message)

    def __reduce__(self):
        # Keeps file/line/field when the error crosses a DataLoader worker boundary.
        return (_rebuild, (type(self), self.reason, self.file, self.line, self.field))

    def to_record(self) -> dict:
        return {"file": self.file, "line": self.line, "field": self.field, "error": self.reason}


class OverlongPair(DataError):
    """A pair longer than ``data.max_length`` that is dropped (not an input error: always skipped,
    counted and listed, whatever ``data.on_bad_sample`` says)."""


def _rebuild(cls, message, file, line, field):
    return cls(message, file=file, line=line, field=field)

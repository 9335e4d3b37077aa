"""The recipe keys documented: each key's text is the docstring under its field."""

from __future__ import annotations

from dataclasses import dataclass

from mpo.config_keys import field_docs


def test_field_docs_are_read_from_the_source():
    @dataclass
    class Example:
        documented: int = 1
        """First line.

        Second paragraph."""
        bare: str = ""
        after: bool = False
        """Only this one."""

    assert field_docs(Example) == {"documented": "First line. Second paragraph.", "after": "Only this one."}

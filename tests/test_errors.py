"""errors.first_line: the one way to put an exception into a one-line message."""

from __future__ import annotations

from llmfoundry_lite.errors import first_line


def test_first_line_of_exceptions_and_texts():
    assert first_line(ValueError("bad value\nTraceback detail")) == "bad value"
    assert (
        first_line(RuntimeError("\n  \n  second line is the first with text \n"))
        == "second line is the first with text"
    )
    assert first_line(KeyError()) == "KeyError"  # an empty message: its type, never an IndexError
    assert first_line(OSError("")) == "OSError"
    assert first_line("") == "" and first_line("a\nb") == "a"

"""Assertions shared by the command-line tests."""

from __future__ import annotations


def one_line_error(result, *fragments: str) -> str:
    """A CLI result that failed with exit 2 and exactly one ``spdecay: error:`` line holding
    every fragment (no traceback); returns that line."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("spdecay: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]

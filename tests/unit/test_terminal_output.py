"""`gpulab logs` to a terminal (jobs.text.terminal_output): colours and cursor moves pass,
every other escape is shown escaped."""

from __future__ import annotations

import pytest

from jobs.text import terminal_output


@pytest.mark.parametrize("digit", ["\u0663", "\u00b2", "\U0001d7d8", "\uff11"])
def test_a_csi_with_a_digit_that_is_not_ascii_is_escaped(digit: str) -> None:
    """str.isdigit() is true for Arabic-Indic, superscript, mathematical and full-width digits:
    `ESC [ ٣ m` passed as a colour, and a raw ESC reached the reader's terminal followed by
    bytes no terminal defines there."""
    shown = terminal_output(f"a\x1b[{digit}mb")
    assert "\x1b" not in shown, repr(shown)


def test_colours_and_cursor_moves_still_pass() -> None:
    assert terminal_output("\x1b[31mred\x1b[0m\r\x1b[2K\x1b[1;2H") == "\x1b[31mred\x1b[0m\r\x1b[2K\x1b[1;2H"

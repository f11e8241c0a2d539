"""The size parser is the one gate for `--mem`, config sizes and simulated GPUs."""

from __future__ import annotations

import pytest

from jobs.sizes import GiB, KiB, MiB, TiB, format_size, parse_size

GOOD = [
    ("12GiB", 12 * GiB),
    ("12G", 12 * GiB),
    ("12g", 12 * GiB),
    ("12Gi", 12 * GiB),
    ("12gib", 12 * GiB),
    ("12 GiB", 12 * GiB),
    ("  12GiB  ", 12 * GiB),
    ("+12GiB", 12 * GiB),
    ("12000MiB", 12000 * MiB),
    ("12000M", 12000 * MiB),
    ("10G", 10 * GiB),
    ("1.5TiB", 3 * TiB // 2),
    ("1.5T", 3 * TiB // 2),
    ("0.5GiB", GiB // 2),
    (".5GiB", GiB // 2),
    ("512KiB", 512 * KiB),
    ("64K", 64 * KiB),
    ("500MB", 500 * 10**6),
    ("12GB", 12 * 10**9),
    ("1KB", 1000),
    ("2TB", 2 * 10**12),
    ("1PiB", 2**50),
    ("4096B", 4096),
    ("1048576", MiB),
    ("25769803776", 24 * GiB),
    (25769803776, 24 * GiB),
    ("0.1GiB", int(0.1 * GiB)),  # rounded down to whole bytes
]

BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("0", "more than zero"),
    ("0GiB", "more than zero"),
    ("0.0", "more than zero"),
    ("-1GiB", "positive"),
    ("-5", "positive"),
    ("0.5", "needs a unit"),
    ("1.5", "needs a unit"),
    ("12", "needs a unit"),
    ("1048575", "needs a unit"),
    ("12X", "unknown unit"),
    ("12 GiBs", "unknown unit"),
    ("1e9", "accepted forms"),
    ("nan", "accepted forms"),
    ("NaN GiB", "accepted forms"),
    ("inf", "accepted forms"),
    ("infGiB", "accepted forms"),
    ("GiB", "accepted forms"),
    ("12 G iB", "accepted forms"),
    ("1,5GiB", "accepted forms"),
    ("1_000MiB", "accepted forms"),
    ("twelve", "accepted forms"),
    ("10000000PiB", "too large"),
    (True, "accepted forms"),
]


@pytest.mark.parametrize(("text", "expected"), GOOD)
def test_parse_good(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "fragment"), BAD)
def test_parse_bad(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_bare_fraction_says_memory_needs_a_unit() -> None:
    with pytest.raises(ValueError, match="memory needs a unit"):
        parse_size("0.5")


def test_zero_only_where_allowed() -> None:
    assert parse_size("0", allow_zero=True) == 0
    assert parse_size("0MiB", allow_zero=True) == 0
    assert parse_size("256MiB", allow_zero=True) == 256 * MiB
    with pytest.raises(ValueError):
        parse_size("-1", allow_zero=True)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (64 * KiB, "64KiB"),
        (512 * MiB, "512MiB"),
        (10 * GiB, "10.0GiB"),
        (int(1.5 * GiB), "1.5GiB"),
        (80 * GiB, "80.0GiB"),
        (3 * TiB // 2, "1.5TiB"),
        (-2 * GiB, "-2.0GiB"),
        (-3 * MiB, "-3MiB"),
    ],
)
def test_format(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize("n", [MiB, 512 * MiB, 10 * GiB, 24 * GiB, 3 * TiB // 2])
def test_format_reads_back(n: int) -> None:
    assert parse_size(format_size(n)) == n

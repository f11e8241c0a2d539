"""Memory sizes as people type them (`12GiB`, `12G`, `12000MiB`) and as we print them.

One parser for the CLI (`--mem`), the config file and the simulated GPUs, so every place
accepts the same forms and rejects the same mistakes with the same message.

Units: `K`/`Ki`/`KiB`, `M`/`Mi`/`MiB`, `G`/`Gi`/`GiB`, `T`/`Ti`/`TiB`, `P`/`Pi`/`PiB` are
binary (powers of 1024: what nvidia-smi and torch print, so `24G` means a 24GiB card);
`KB`, `MB`, `GB`, `TB`, `PB` are decimal (powers of 1000, as disk vendors use them); `B` is
bytes. Units are case-insensitive and may follow the number after a space. Fractions are
fine with a unit (`1.5TiB`) and rounded down to whole bytes.

A bare number is bytes, accepted only from 1MiB (1048576) up and only as an integer: a
bare `12` or `0.5` is almost certainly someone meaning gigabytes or half a card, and
memory is requested in bytes per GPU, not as a fraction of one (docs/ARCHITECTURE.md, "Memory accounting").
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
PiB = 1024**5

MAX_SIZE = 2**63 - 1  # fits a Redis integer and a C int64

ACCEPTED = "accepted forms: 12GiB, 12G, 12000MiB, 1.5TiB, 500MB (decimal), or plain bytes >= 1048576"

_UNITS: dict[str, int] = {
    "b": 1,
    "k": KiB, "ki": KiB, "kib": KiB,
    "m": MiB, "mi": MiB, "mib": MiB,
    "g": GiB, "gi": GiB, "gib": GiB,
    "t": TiB, "ti": TiB, "tib": TiB,
    "p": PiB, "pi": PiB, "pib": PiB,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
}  # fmt: skip

_SIZE_RE = re.compile(r"^(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-zA-Z]*)$")


def parse_size(text: str | int, *, allow_zero: bool = False) -> int:
    """Bytes for `text`; ValueError with one line naming the accepted forms otherwise.

    `allow_zero` is for settings where 0 means "none" (a headroom or buffer), never for a
    request or a GPU size.
    """
    if isinstance(text, bool):  # True is an int to Python, never a size to a person
        raise ValueError(f"invalid size {text!r}: {ACCEPTED}")
    if isinstance(text, int):
        text = str(text)
    raw = text
    text = text.strip()
    if not text:
        raise ValueError(f"empty size: {ACCEPTED}")
    if text.startswith("-"):
        raise ValueError(f"invalid size {raw!r}: must be positive; {ACCEPTED}")
    text = text.removeprefix("+")
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid size {raw!r}: {ACCEPTED}")
    num, unit = match["num"], match["unit"].lower()
    try:
        value = Decimal(num)
    except InvalidOperation:  # pragma: no cover - the regex admits only digits and one dot
        raise ValueError(f"invalid size {raw!r}: {ACCEPTED}") from None
    if not unit:
        if value == 0:
            if allow_zero:
                return 0
            raise ValueError(f"invalid size {raw!r}: must be more than zero; {ACCEPTED}")
        if value != value.to_integral_value() or "." in num:
            raise ValueError(f"invalid size {raw!r}: memory needs a unit (not a fraction of a card); {ACCEPTED}")
        if value < MiB:
            raise ValueError(f"invalid size {raw!r}: memory needs a unit (a bare number is bytes); {ACCEPTED}")
        scale = 1
    elif unit in _UNITS:
        scale = _UNITS[unit]
    else:
        raise ValueError(f"invalid size {raw!r}: unknown unit {match['unit']!r}; {ACCEPTED}")
    nbytes = int(value * scale)  # int() of a Decimal rounds toward zero: whole bytes
    if nbytes == 0 and not (allow_zero and value == 0):
        raise ValueError(f"invalid size {raw!r}: must be more than zero; {ACCEPTED}")
    if nbytes > MAX_SIZE:
        raise ValueError(f"invalid size {raw!r}: too large (at most 8EiB)")
    return nbytes


def format_size(n: int) -> str:
    """Short human form that parse_size reads back: `512B`, `64KiB`, `512MiB`, `10.0GiB`, `1.5TiB`.

    Like nvitop: whole KiB/MiB, one decimal from GiB up (enough to compare GPUs at a glance).
    Negative values (differences) keep their sign.
    """
    sign = "-" if n < 0 else ""
    n = abs(int(n))
    if n < KiB:
        return f"{sign}{n}B"
    if n < MiB:
        return f"{sign}{round(n / KiB)}KiB"
    if n < GiB:
        return f"{sign}{round(n / MiB)}MiB"
    if n < TiB:
        return f"{sign}{n / GiB:.1f}GiB"
    if n < PiB:
        return f"{sign}{n / TiB:.1f}TiB"
    return f"{sign}{n / PiB:.1f}PiB"

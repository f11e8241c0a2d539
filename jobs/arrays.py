"""Job arrays (`--array 0-31%4`): Slurm's index syntax, parsed and printed.

A task of array A with index i is an ordinary job (its own id, record and history) that
carries `array_id` = A and `array_index` = i; the worker gives it GPULAB_ARRAY_INDEX.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

MAX_ARRAY_TASKS = 10_000  # hard cap of the syntax; [policy] max_array_size is the lab's cap
MAX_ARRAY_INDEX = 1_000_000
_ITEM_RE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")
_HELP = "use e.g. 0-31, 0-31%4, 1,3,5 or 0-30:2"


@dataclass(frozen=True)
class ArraySpec:
    indexes: tuple[int, ...]
    throttle: int = 0  # at most this many tasks running at once; 0 = no limit

    def __str__(self) -> str:
        return format_indexes(self.indexes) + (f"%{self.throttle}" if self.throttle else "")


@lru_cache(maxsize=1024)
def parse_array(text: str) -> ArraySpec:
    """`0-31%4` -> indexes 0..31, throttle 4. Raises ValueError with one line for the user."""
    body, _, throttle_text = text.strip().partition("%")
    throttle = 0
    if throttle_text:
        if not throttle_text.isdigit() or int(throttle_text) < 1:
            raise ValueError(f"'{text}': the limit after % must be a whole number, 1 or more")
        throttle = int(throttle_text)
    indexes: set[int] = set()
    for item in body.split(","):
        match = _ITEM_RE.match(item.strip())
        if not match:
            raise ValueError(f"'{text}' is not an index list; {_HELP}")
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        step = int(match[3]) if match[3] is not None else 1
        if last < first or step < 1 or last > MAX_ARRAY_INDEX:
            raise ValueError(f"'{text}': ranges go up (0-31), steps are 1 or more, indexes <= {MAX_ARRAY_INDEX}")
        if (last - first) // step + 1 + len(indexes) > MAX_ARRAY_TASKS:
            raise ValueError(f"'{text}' has more than {MAX_ARRAY_TASKS} tasks")
        indexes.update(range(first, last + 1, step))
    return ArraySpec(tuple(sorted(indexes)), throttle)


def format_indexes(indexes: tuple[int, ...] | list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts: list[str] = []
    ordered = sorted(indexes)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)

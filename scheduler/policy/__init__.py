"""Pure scheduling policy: placement, accounting, fair share, feasibility, limits, reservations.

No Redis, no clock, no I/O (enforced by the import contract in pyproject.toml): every input
is a value, so each function is tested by properties and replayed against real traces.
"""

"""`gpulab doctor`'s view of every daemon: one line each with its gpulab version, its clock's
offset from Redis's (measured by the daemon itself against Redis TIME), and when it last
checked in; then one line on whether the versions agree (jobs/daemons.py)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import redis

from cli.doctor import SKEW_FAIL_S, SKEW_WARN_S, Check
from jobs.daemons import CHECKIN_INTERVAL_S, live_daemons
from jobs.text import safe
from jobs.version import gpulab_version

SEEN_WARN_S = 3 * CHECKIN_INTERVAL_S


def check_daemons(client: redis.Redis) -> Iterator[Check]:
    daemons, now = live_daemons(client)
    if not daemons:
        yield Check("WARN", "daemons", "none has checked in: none runs, or they predate version checks; restart them")
        return
    for d in daemons:
        offset, age = d.clock_offset_s, now - d.seen_at
        if offset is None:
            level, clock = "WARN", "clock offset unknown"
        else:
            level = "FAIL" if abs(offset) > SKEW_FAIL_S else "WARN" if abs(offset) > SKEW_WARN_S else "ok"
            rtt = f" (rtt {d.rtt_s * 1000:.1f} ms)" if d.rtt_s is not None else ""
            clock = f"clock {offset:+.3f}s vs Redis{rtt}" + ("; run chrony/ntp there" if level != "ok" else "")
        if age > SEEN_WARN_S and level == "ok":
            level = "WARN"
        where = f"{safe(d.host, 100)} pid {d.pid}"
        message = f"gpulab {safe(d.version, 50)} on {where}, {clock}, seen {age:.1f}s ago"
        yield Check(level, f"{safe(d.kind, 20)} {safe(d.name, 100)}", message)
    by_version: dict[str, list[str]] = defaultdict(list)
    for d in daemons:
        by_version[d.version].append(f"{d.kind} {d.name}")
    if len(by_version) > 1:
        parts = "; ".join(f"{safe(v, 50)}: {', '.join(safe(n, 100) for n in names)}" for v, names in by_version.items())
        yield Check("WARN", "versions", f"mixed ({parts}): fine during a rolling upgrade, else upgrade the rest")
    else:
        version = next(iter(by_version))
        note = "" if version == gpulab_version() else f" (this gpulab is {gpulab_version()})"
        yield Check("ok", "versions", f"every daemon runs gpulab {safe(version, 50)}{note}")

"""How a job's fields read as text, shared by every renderer (CLI, `top`, status page).

Much of a job's record is written by people or programs other than the reader: the job's
name and command by its owner, its progress by the job itself, reasons by the daemons. So
every string that reaches a terminal or a page goes through `safe`, which escapes control
characters (no escape sequence from a job reaches another user's terminal) and caps the
length; numbers from a job's status are read with `number`, which never raises.
"""

from __future__ import annotations

import math
from typing import Any

MAX_FIELD_CHARS = 200
# What of a job's status other users see: training progress, as numbers (the job writes the
# status, so nothing else of it - metrics, text, paths - is shown beyond its owner).
PUBLIC_PROGRESS = ("epoch", "epochs", "step", "loss", "samples_per_s", "eta_s")


def safe(value: object, limit: int = MAX_FIELD_CHARS) -> str:
    """`value` as one printable line: C0/C1 controls and DEL escaped as \\xNN, cut at `limit`."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def number(value: Any) -> float | None:
    """A finite number from untrusted JSON, or None (strings, lists, NaN, bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        result = float(value)
    except OverflowError:  # an int past 1e308
        return None
    return result if math.isfinite(result) else None


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    seconds = int(min(seconds, 10**9))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:d}:{secs:02d}"


def progress(job: dict[str, Any]) -> str:
    """A training job's progress ("ep 3/10 step 120 loss 0.31 450/s eta 2:10"), or ""."""
    status = job.get("status")
    if not isinstance(status, dict) or status.get("kind") != "training":
        return ""
    parts = [f"ep {_int_text(status.get('epoch'))}/{_int_text(status.get('epochs'))}"]
    parts.append(f"step {_int_text(status.get('step'))}")
    loss = number(status.get("loss"))
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    rate = number(status.get("samples_per_s"))
    if rate:
        parts.append(f"{rate:.0f}/s")
    eta = number(status.get("eta_s"))
    if eta is not None and not status.get("final"):
        parts.append(f"eta {duration(eta)}")
    return " ".join(parts)


def public_status(status: Any) -> dict[str, Any] | None:
    """The part of a job-written status every user may see (`progress` reads only this)."""
    if not isinstance(status, dict) or status.get("kind") != "training":
        return None
    public: dict[str, Any] = {"kind": "training", "final": status.get("final") is True}
    for key in PUBLIC_PROGRESS:
        value = number(status.get(key))
        if value is not None:
            public[key] = value
    return public


def _int_text(value: Any) -> str:
    n = number(value)
    return "?" if n is None else str(int(n))


def why(job: dict[str, Any]) -> str:
    """Reason, detail and memory warning on one line (escaped)."""
    parts = [safe(p) for p in (job.get("reason"), job.get("detail"), job.get("mem_warning")) if p]
    if job.get("state") == "FAILED" and job.get("exit_code") is not None and job.get("reason") == "ExitCode":
        parts = [f"ExitCode {job['exit_code']}"]
    return "; ".join(parts)


# ---- a job's own output on a terminal (`gpulab logs`) --------------------------------------------
# What progress bars and coloured logs need: SGR colours and cursor moves/erases (CSI with
# digits and ';' only). Everything else that a terminal acts on - OSC (titles, clipboard,
# hyperlinks), DCS/APC/PM strings, queries that make the terminal type an answer into the
# reader's shell (`ESC[6n`, `ESC[21t`), resets, 8-bit C1 controls - is shown escaped.
_CSI_ALLOWED_FINALS = frozenset("ABCDEFGHJKfm")
_KEPT_CONTROLS = frozenset("\n\r\t\b")
_CSI_PARAMETERS = frozenset("0123456789;")


def terminal_output(text: str) -> str:
    """A job's output made safe for a terminal, keeping what `tqdm`-like output needs."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\x1b" and i + 1 < n and text[i + 1] == "[":
            j = i + 2
            while j < n and text[j] in _CSI_PARAMETERS:  # ASCII only: str.isdigit() takes '٣', '²'...
                j += 1
            if j < n and text[j] in _CSI_ALLOWED_FINALS and j - i <= 32:
                out.append(text[i : j + 1])
                i = j + 1
                continue
        if ch.isprintable() or ch in _KEPT_CONTROLS:
            out.append(ch)
        else:
            out.append(_escape(ch))
        i += 1
    return "".join(out)

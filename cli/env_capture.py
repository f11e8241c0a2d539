"""Which environment a job gets: the submitting shell's (the default), only named variables
(`--export NAME,NAME`, like `sbatch --export`), plus KEY=VALUE lines from `--env-file`.

Values may be secrets: errors name the file, line and variable, never a value.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Collection, Mapping
from pathlib import Path

from jobs.spec import SpecError

# Always exported with --export: without them most programs do not start.
ALWAYS = ("PATH", "HOME", "USER", "LANG")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def captured_env(
    environ: Mapping[str, str], drop: Collection[str], *, export: str | None = None, env_file: str | None = None
) -> dict[str, str]:
    if export is None or export.strip().upper() == "ALL":
        env = {k: v for k, v in environ.items() if k not in drop}
    else:
        names = [] if export.strip().upper() == "NONE" else [n.strip() for n in export.split(",") if n.strip()]
        for name in names:
            if not _NAME_RE.match(name):
                raise SpecError("--export", f"'{name[:40]}' is not a variable name (NAME,NAME or ALL or NONE)")
        env = {k: environ[k] for k in (*ALWAYS, *names) if k in environ and k not in drop}
    if env_file is not None:
        env.update(read_env_file(Path(env_file)))
    return env


MAX_ENV_FILE_BYTES = 1024 * 1024  # far above any real env file; the submit caps apply after


def _read_regular_file(path: Path) -> str:
    """The file's text; a FIFO, socket or device is refused (opened non-blocking, so a FIFO
    with no writer cannot hang the CLI) and so is anything over MAX_ENV_FILE_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError("--env-file", f"{path} is not a regular file")
        data = f.read(MAX_ENV_FILE_BYTES + 1)
    if len(data) > MAX_ENV_FILE_BYTES:
        raise SpecError("--env-file", f"{path} is larger than {MAX_ENV_FILE_BYTES} bytes")
    return data.decode()


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE per line; blank lines and `#` comments skipped; `export KEY=VALUE` and one
    pair of surrounding quotes accepted (the dotenv subset people actually write)."""
    try:
        text = _read_regular_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError("--env-file", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _NAME_RE.match(key):
            raise SpecError("--env-file", f"{path} line {number}: expected KEY=VALUE with KEY a variable name")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env

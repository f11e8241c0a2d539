"""Forks one command through the shim's gate (worker/shim.py `Shim.prepare`), native or Python.

    python -I -S gate_probe.py MODE ACTION LAUNCH_JSON

MODE: `native` (the C gate; exit 3 if it is not loaded) or `python` (the Python gate).
ACTION: `go` (open the gate), `close` (close it without the byte) or `hold` (print the
command's pid on stderr, then wait to be killed). The command writes to this process's
stdout; the result goes to stderr as one JSON line: the failure the shim would report
("" when none) and the command's exit code.
"""

from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "worker"))
import shim  # by path: the shim imports only the standard library, as here


def main(mode: str, action: str, launch_json: str) -> int:
    if mode == "python":
        shim.NATIVE_GATE = None
    elif shim.NATIVE_GATE is None:
        print("the native gate is not loaded", file=sys.stderr)
        return 3
    values = {"node": "n", "job": "1", "attempt": "1", "worker-pid": str(os.getppid()), "lease-ttl": "30"}
    probe = shim.Shim(shim.Options.from_values({**values, "kill-grace": "1", "report-fd": "2"}))
    failure = probe.prepare(json.loads(launch_json))
    if not failure:
        if action == "hold":
            print(probe.child, file=sys.stderr, flush=True)
            while True:
                signal.pause()
        if action == "go":
            failure = probe.release_child()
        else:
            os.close(probe.gate_w)
            os.close(probe.err_r)
        _, status = os.waitpid(probe.child, 0)
        code: int | None = os.waitstatus_to_exitcode(status)
    else:
        code = None
    print(json.dumps({"failure": failure, "code": code}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

"""A test job: 'allocates' SIZE on its simulated GPU (or nothing for 0), prints a line, then
blocks on a FIFO until the test writes an exit code into it. No sleeps: the test decides.

    python -m tests.helpers.hold_job SIZE FIFO [--child] [--util=PCT]

SIZE may be `@FILE`: the size is read from that file (runs with the same argv that hold
different amounts, as reruns of one job do).

With --child it also starts a child process that holds on (for process-tree tests) and
prints the child's pid.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jobs.sizes import parse_size


def main() -> int:
    size_text, fifo = sys.argv[1], sys.argv[2]
    if size_text.startswith("@"):
        size_text = Path(size_text[1:]).read_text().strip()
    size = 0 if size_text == "0" else parse_size(size_text)
    sim_dir = os.environ.get("GPULAB_SIM_DIR")
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    if size and sim_dir and gpus:
        for uuid in gpus:
            folder = Path(sim_dir) / uuid
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{os.getpid()}.tmp"
            util = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--util=")), None)
            tmp.write_text(str(size) if util is None else f"{size} {util}")
            tmp.replace(folder / str(os.getpid()))
    if "--child" in sys.argv:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        print(f"child {child.pid}", flush=True)
    print(f"holding {size} on {','.join(gpus)} pid {os.getpid()}", flush=True)
    with open(fifo) as f:  # blocks until the test opens the FIFO for writing
        code = f.read().strip()
    print(f"released with {code}", flush=True)
    return int(code or "0")


if __name__ == "__main__":
    sys.exit(main())

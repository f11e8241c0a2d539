"""Submit N jobs through the API as fast as possible; print their ids, one per line.

python -m tests.helpers.submitter SOCKET N
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cli.client import ApiClient


def main() -> int:
    client = ApiClient(Path(sys.argv[1]))
    spec = {"command": ["true"], "cwd": "/", "mem_bytes": 2**30, "requeue": True, "env": {"PATH": os.environ["PATH"]}}
    ids = [client.submit(spec) for _ in range(int(sys.argv[2]))]
    print("\n".join(str(i) for i in ids), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

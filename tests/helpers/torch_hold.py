"""A GPU test job: allocates SIZE with torch on its (only visible) GPU, prints its device's
uuid and what it holds, then blocks on a FIFO until the test writes an exit code into it.

    python -m tests.helpers.torch_hold SIZE FIFO
"""

from __future__ import annotations

import sys

import torch

from jobs.sizes import parse_size


def main() -> int:
    size, fifo = parse_size(sys.argv[1]), sys.argv[2]
    device = torch.device("cuda", 0)
    block = torch.empty(size, dtype=torch.uint8, device=device)
    block.fill_(1)
    torch.cuda.synchronize()
    uuid = torch.cuda.get_device_properties(0).uuid
    print(f"holding {block.numel()} bytes on GPU-{uuid}", flush=True)
    with open(fifo) as f:
        code = f.read().strip()
    return int(code or "0")


if __name__ == "__main__":
    sys.exit(main())

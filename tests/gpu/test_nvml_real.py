"""NvmlProbe on a real GPU, checked against what CUDA itself (through torch) reports.

These pin down the two facts placement rests on: NVML's free memory is the free memory a
CUDA program sees, and the uuid the worker puts in CUDA_VISIBLE_DEVICES (with
CUDA_DEVICE_ORDER=PCI_BUS_ID) selects exactly the NVML device it measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from jobs.gpus import GpuDevice
from jobs.sizes import GiB, MiB, format_size
from worker.nvml_probe import NvmlProbe

pytestmark = pytest.mark.gpu

FREE_TOLERANCE = 64 * MiB  # other allocations between the two reads, rounding in the driver


def normalise_uuid(value: object) -> str:
    """torch prints a bare uuid, NVML prefixes `GPU-`; compare the hex digits."""
    text = str(value).strip().lower()
    return text.removeprefix("gpu-")


@pytest.fixture
def probe() -> Iterator[NvmlProbe]:
    p = NvmlProbe()
    yield p
    p.close()


@pytest.fixture(scope="module")
def torch() -> Any:
    import torch

    return torch


def _device(probe: NvmlProbe, uuid: str) -> GpuDevice:
    for d in probe.snapshot().devices:
        if normalise_uuid(d.uuid) == normalise_uuid(uuid):
            return d
    pytest.fail(f"NVML has no device with uuid {uuid}; it has {[d.uuid for d in probe.snapshot().devices]}")


def test_probe_sees_every_gpu(probe: NvmlProbe, torch: Any) -> None:
    snap = probe.snapshot()
    assert snap.driver
    assert len(snap.devices) == probe.device_count >= 1
    for d in snap.devices:
        assert d.healthy, d.error
        assert d.uuid.startswith(("GPU-", "MIG-")), d.uuid
        assert d.name and d.total_bytes > 0
        assert 0 <= d.free_bytes <= d.total_bytes and 0 <= d.used_bytes <= d.total_bytes
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        assert torch.cuda.device_count() == len(snap.devices)


def test_free_memory_agrees_with_torch_after_1gib(probe: NvmlProbe, torch: Any) -> None:
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    block = torch.empty(GiB, dtype=torch.uint8, device="cuda:0")
    block.fill_(1)
    torch.cuda.synchronize()
    torch_free_1, torch_total = torch.cuda.mem_get_info(0)
    device = _device(probe, uuid)
    torch_free_2, _ = torch.cuda.mem_get_info(0)
    low, high = min(torch_free_1, torch_free_2), max(torch_free_1, torch_free_2)
    assert low - FREE_TOLERANCE <= device.free_bytes <= high + FREE_TOLERANCE, (
        f"NVML free {format_size(device.free_bytes)} vs torch free {format_size(low)}..{format_size(high)}"
    )
    assert abs(torch_total - device.total_bytes) <= FREE_TOLERANCE, (
        f"NVML total {device.total_bytes} vs CUDA total {torch_total}"
    )

    mine = [p for p in device.processes if p.pid == os.getpid()]
    assert mine, (
        f"this process (pid {os.getpid()}) is not in NVML's process list {device.processes}: "
        "are we in a pid namespace? NVML reports host pids"
    )
    assert mine[0].used_bytes >= GiB
    del block


def _torch_uuids_in_subprocess(env_extra: dict[str, str]) -> list[str]:
    code = (
        "import torch\n"
        "for i in range(torch.cuda.device_count()):\n"
        "    print(torch.cuda.get_device_properties(i).uuid)\n"
    )
    env = {**os.environ, **env_extra}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return [normalise_uuid(line) for line in done.stdout.split()]


def test_cuda_visible_devices_uuid_selects_that_nvml_device(probe: NvmlProbe) -> None:
    for device in probe.snapshot().devices:
        seen = _torch_uuids_in_subprocess({"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": device.uuid})
        assert seen == [normalise_uuid(device.uuid)], f"NVML device {device.index}"


def test_pci_bus_order_matches_nvml_order(probe: NvmlProbe) -> None:
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        pytest.skip("CUDA_VISIBLE_DEVICES is set: torch sees a subset")
    seen = _torch_uuids_in_subprocess(env)
    assert seen == [normalise_uuid(d.uuid) for d in probe.snapshot().devices]

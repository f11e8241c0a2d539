"""NvmlProbe against NVML's own Python surface, with the driver calls replaced.

The real `pynvml` module stays in place: only its functions that would reach the driver
are patched, and the fakes return pynvml's own ctypes structs and raise its own
exception classes, so the probe meets exactly the shapes it meets on a real GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml
import pytest

from jobs.gpus import GpuProcess, GpuSnapshot
from jobs.sizes import GiB, MiB
from worker.nvml_probe import GpuProbeError, NvmlProbe, nvml_available
from worker.probe import GpuProbe

REPO = Path(__file__).resolve().parents[2]
DRIVER = "580.159.04"


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * GiB
    reserved: int = 512 * MiB
    used: int = 0
    util: int | None = 0  # None: NOT_SUPPORTED
    compute: list[tuple[int, int | None]] = field(default_factory=list)
    graphics: list[tuple[int, int | None]] | None = field(default_factory=list)  # None: NOT_SUPPORTED
    lost: bool = False
    generation: int = 0  # a handle from before a loss stays invalid after recovery
    fail: dict[str, Exception] = field(default_factory=dict)  # function name -> error to raise


@dataclass(frozen=True)
class Handle:
    index: int
    generation: int


class FakeNvml:
    """Driver state behind the patched pynvml functions."""

    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.calls: dict[str, list[Any]] = {}
        self.init_error: Exception | None = None
        self.no_memory_v2 = False
        self.mismatch_v3 = False

    def lose(self, index: int) -> None:
        self.gpus[index].lost = True
        self.gpus[index].generation += 1

    def _log(self, name: str, arg: Any = None) -> None:
        self.calls.setdefault(name, []).append(arg)

    def _gpu(self, name: str, handle: Handle) -> FakeGpu:
        self._log(name, handle.index)
        gpu = self.gpus[handle.index]
        if gpu.lost or handle.generation != gpu.generation:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in gpu.fail:
            raise gpu.fail[name]
        return gpu

    # -- the patched functions ----------------------------------------------------------

    def nvmlInit(self) -> None:
        self._log("nvmlInit")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self._log("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self) -> str:
        return DRIVER

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        self._log("nvmlDeviceGetHandleByIndex", index)
        gpu = self.gpus[index]
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return Handle(index, gpu.generation)

    def nvmlDeviceGetUUID(self, handle: Handle) -> str:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: Handle) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: Handle, version: int | None = None) -> Any:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        if version:
            self._log("memory_v2")
            if self.no_memory_v2:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            assert version == pynvml.nvmlMemory_v2
            free = gpu.total - gpu.reserved - gpu.used
            return pynvml.c_nvmlMemory_v2_t(version, gpu.total, gpu.reserved, free, gpu.used)
        self._log("memory_v1")
        return pynvml.c_nvmlMemory_t(gpu.total, gpu.total - gpu.reserved - gpu.used, gpu.used + gpu.reserved)

    def nvmlDeviceGetUtilizationRates(self, handle: Handle) -> Any:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        if gpu.util is None:
            raise pynvml.NVMLError_NotSupported()
        return pynvml.c_nvmlUtilization_t(gpu.util, 0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Handle) -> list[Any]:
        if self.mismatch_v3:
            raise pynvml.NVMLLibraryMismatchError("no _v3")
        return _procs(self._gpu("nvmlDeviceGetComputeRunningProcesses", handle).compute)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: Handle) -> list[Any]:
        return _procs(self._gpu("nvmlDeviceGetComputeRunningProcesses_v2", handle).compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Handle) -> list[Any]:
        if self.mismatch_v3:
            raise pynvml.NVMLLibraryMismatchError("no _v3")
        gpu = self._gpu("nvmlDeviceGetGraphicsRunningProcesses", handle)
        if gpu.graphics is None:
            raise pynvml.NVMLError_NotSupported()
        return _procs(gpu.graphics)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: Handle) -> list[Any]:
        gpu = self._gpu("nvmlDeviceGetGraphicsRunningProcesses_v2", handle)
        return _procs(gpu.graphics or [])


PATCHED = [name for name in vars(FakeNvml) if name.startswith("nvml")]


def _procs(entries: list[tuple[int, int | None]]) -> list[Any]:
    """What pynvml returns: friendly objects from c_nvmlProcessInfo structs, None when N/A."""
    out = []
    for pid, used in entries:
        raw = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value if used is None else used
        obj = pynvml.nvmlStructToFriendlyObject(pynvml.c_nvmlProcessInfo_v2_t(pid, raw, 0, 0))
        if obj.usedGpuMemory == pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value:
            obj.usedGpuMemory = None  # exactly what pynvml does
        out.append(obj)
    return out


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    nvml = FakeNvml(
        [
            FakeGpu("GPU-aaaaaaaa-0000", used=10 * GiB, util=87, compute=[(4242, 6 * GiB), (1001, 4 * GiB)]),
            FakeGpu("GPU-bbbbbbbb-1111", graphics=[(777, 256 * MiB)]),
        ]
    )
    for name in PATCHED:
        assert hasattr(pynvml, name), name  # patch only what the real bindings have
        monkeypatch.setattr(pynvml, name, getattr(nvml, name))
    return nvml


def test_two_healthy_gpus(fake: FakeNvml) -> None:
    probe: GpuProbe = NvmlProbe()
    snap = probe.snapshot()
    assert snap.driver == DRIVER
    d0, d1 = snap.devices
    assert (d0.index, d0.uuid, d0.healthy, d0.error) == (0, "GPU-aaaaaaaa-0000", True, None)
    assert d0.name == "NVIDIA H100 80GB HBM3"
    # v2: the driver's reservation is neither usable total nor used (CUDA's own view)
    assert (d0.total_bytes, d0.used_bytes) == (80 * GiB - 512 * MiB, 10 * GiB)
    assert d0.free_bytes == 80 * GiB - 512 * MiB - 10 * GiB
    assert d0.free_bytes + d0.used_bytes == d0.total_bytes
    assert d0.utilization_pct == 87
    assert d0.processes == (GpuProcess(1001, 4 * GiB), GpuProcess(4242, 6 * GiB))
    assert (d1.index, d1.uuid, d1.used_bytes, d1.utilization_pct) == (1, "GPU-bbbbbbbb-1111", 0, 0)
    assert d1.processes == (GpuProcess(777, 256 * MiB),)
    assert GpuSnapshot.from_json(snap.to_json()) == snap
    probe.close()


def test_lost_gpu_is_unhealthy_with_last_known_identity(fake: FakeNvml) -> None:
    probe = NvmlProbe()
    probe.snapshot()
    fake.lose(1)
    d0, d1 = probe.snapshot().devices
    assert d0.healthy and d0.used_bytes == 10 * GiB
    assert not d1.healthy
    assert d1.error is not None and "GPU is lost" in d1.error
    assert (d1.uuid, d1.name, d1.total_bytes) == ("GPU-bbbbbbbb-1111", "NVIDIA H100 80GB HBM3", 80 * GiB - 512 * MiB)
    assert (d1.free_bytes, d1.used_bytes, d1.processes, d1.utilization_pct) == (0, 0, (), None)


def test_gpu_lost_before_first_read_gets_a_placeholder(fake: FakeNvml) -> None:
    fake.lose(0)
    d0, d1 = NvmlProbe().snapshot().devices
    assert not d0.healthy and d0.uuid == "GPU-unknown-0" and d0.total_bytes == 0
    assert d1.healthy


def test_handle_is_reacquired_after_a_lost_gpu_returns(fake: FakeNvml) -> None:
    probe = NvmlProbe()
    probe.snapshot()
    probe.snapshot()
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == [0, 1]  # cached after the first read
    fake.lose(1)
    assert not probe.snapshot().devices[1].healthy  # the cached handle fails; it is dropped
    assert not probe.snapshot().devices[1].healthy  # re-acquiring fails while still lost
    fake.gpus[1].lost = False
    d1 = probe.snapshot().devices[1]
    assert d1.healthy and d1.uuid == "GPU-bbbbbbbb-1111"
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == [0, 1, 1, 1]
    probe.snapshot()
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == [0, 1, 1, 1]


def test_other_errors_keep_the_handle(fake: FakeNvml) -> None:
    probe = NvmlProbe()
    fake.gpus[0].fail["nvmlDeviceGetMemoryInfo"] = pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
    d0 = probe.snapshot().devices[0]
    assert not d0.healthy and d0.error == "NVML: Unknown Error"
    del fake.gpus[0].fail["nvmlDeviceGetMemoryInfo"]
    assert probe.snapshot().devices[0].healthy
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == [0, 1]


def test_unexpected_exception_is_a_value_too(fake: FakeNvml) -> None:
    fake.gpus[1].fail["nvmlDeviceGetName"] = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")
    d0, d1 = NvmlProbe().snapshot().devices
    assert d0.healthy
    assert not d1.healthy and d1.error is not None and d1.error.startswith("unexpected UnicodeDecodeError")


def test_utilization_not_supported_is_none(fake: FakeNvml) -> None:
    fake.gpus[0].util = None
    d0 = NvmlProbe().snapshot().devices[0]
    assert d0.healthy and d0.utilization_pct is None


def test_process_memory_not_available_counts_zero(fake: FakeNvml) -> None:
    fake.gpus[0].compute = [(50, None), (51, GiB)]
    d0 = NvmlProbe().snapshot().devices[0]
    assert d0.healthy
    assert d0.processes == (GpuProcess(50, 0), GpuProcess(51, GiB))


def test_compute_and_graphics_merge_by_pid(fake: FakeNvml) -> None:
    fake.gpus[1].compute = [(10, 2 * GiB)]
    fake.gpus[1].graphics = [(10, 2 * GiB), (11, MiB)]
    assert NvmlProbe().snapshot().devices[1].processes == (GpuProcess(10, 2 * GiB), GpuProcess(11, MiB))


def test_graphics_not_supported_is_no_processes(fake: FakeNvml) -> None:
    fake.gpus[1].graphics = None
    d1 = NvmlProbe().snapshot().devices[1]
    assert d1.healthy and d1.processes == ()


def test_old_driver_falls_back_to_memory_v1_once(fake: FakeNvml) -> None:
    fake.no_memory_v2 = True
    probe = NvmlProbe()
    d0 = probe.snapshot().devices[0]
    assert d0.healthy
    assert d0.used_bytes == 10 * GiB + 512 * MiB  # v1 counts the reservation as used ...
    assert d0.free_bytes == 80 * GiB - 512 * MiB - 10 * GiB  # ... so free is the same as with v2
    assert d0.total_bytes == 80 * GiB
    probe.snapshot()
    assert len(fake.calls["memory_v2"]) == 1
    assert len(fake.calls["memory_v1"]) == 4


def test_old_driver_falls_back_to_process_v2(fake: FakeNvml) -> None:
    fake.mismatch_v3 = True
    d0, d1 = NvmlProbe().snapshot().devices
    assert d0.healthy and d0.processes == (GpuProcess(1001, 4 * GiB), GpuProcess(4242, 6 * GiB))
    assert d1.processes == (GpuProcess(777, 256 * MiB),)


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_init_failure_is_a_clear_probe_error(fake: FakeNvml, code: int) -> None:
    fake.init_error = pynvml.NVMLError(code)
    with pytest.raises(GpuProbeError, match="NVML is unavailable"):
        NvmlProbe()
    assert not nvml_available()


def test_nvml_available_with_the_fake(fake: FakeNvml) -> None:
    assert nvml_available()
    assert len(fake.calls["nvmlShutdown"]) == 1
    fake.gpus.clear()
    assert not nvml_available()  # a driver with no GPU is nothing to schedule on


def test_close_is_idempotent_and_final(fake: FakeNvml) -> None:
    with NvmlProbe() as probe:
        probe.snapshot()
    probe.close()
    assert len(fake.calls["nvmlShutdown"]) == 1
    with pytest.raises(GpuProbeError):
        probe.snapshot()


@pytest.mark.skipif(nvml_available(), reason="this machine has a working NVIDIA driver")
def test_real_bindings_without_a_driver_raise_probe_error() -> None:
    with pytest.raises(GpuProbeError, match="NVML is unavailable"):
        NvmlProbe()


def test_importing_the_module_does_not_import_pynvml() -> None:
    code = "import sys, worker.nvml_probe; print('pynvml' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

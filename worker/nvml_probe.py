"""GpuProbe over NVML (the official `nvidia-ml-py` bindings, imported as `pynvml`).

Why it looks like this:
- `pynvml` is imported inside the class, so this module imports (and the worker starts in
  simulation) on a machine without the NVIDIA driver.
- NVML errors become values, as in nvitop: a device whose read fails comes back
  `healthy=False` with the error text and its last known uuid/name/total, and the other
  devices are reported normally. A worker must keep heartbeating through a GPU falling
  off the bus; the scheduler stops placing on the unhealthy GPU.
- Memory comes from `nvmlDeviceGetMemoryInfo` v2 when the driver has it: v2 reports the
  driver's reservation apart, so an idle GPU reads ~0 used. We report total = v2 total -
  reserved: what CUDA can ever hand out, equal to `torch.cuda.mem_get_info()`'s total
  (measured on an H200, driver 580: identical to the byte, with `free` identical too), and
  free + used == total holds. Older drivers (v1 only) count the reservation as used and
  report the card's full size, so the same identity holds there.
- NVML reports host pids. Inside a container with its own pid namespace they do not match
  the pids the worker sees; attribution by process tree then finds nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Self

from jobs.gpus import GpuDevice, GpuProcess, GpuSnapshot


class GpuProbeError(RuntimeError):
    """The probe as a whole cannot work (no driver, NVML failed to start, probe closed)."""


def nvml_available() -> bool:
    """True when NVML loads, initialises and sees at least one GPU (cheap; for auto-detection)."""
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except Exception:  # any failure to start NVML means "not available"
        return False
    try:
        return int(pynvml.nvmlDeviceGetCount()) > 0
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


@dataclass
class _Known:
    """What we last read from a device, reported again when it fails (stable identity)."""

    uuid: str
    name: str
    total: int


class NvmlProbe:
    """Snapshots every GPU NVML enumerates; never raises for one bad GPU."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise GpuProbeError(f"NVML is unavailable: cannot import pynvml ({exc}); install nvidia-ml-py") from None
        self._nvml: Any = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuProbeError(
                f"NVML is unavailable: nvmlInit failed ({exc}); is the NVIDIA driver installed and loaded? "
                "Use simulated GPUs (--sim-gpus) on a machine without one"
            ) from None
        try:
            self._count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            self._shutdown()
            raise GpuProbeError(f"NVML is unavailable: nvmlDeviceGetCount failed ({exc})") from None
        try:
            self._driver = str(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            self._driver = ""
        self._handles: dict[int, Any] = {}
        self._known: dict[int, _Known] = {}
        self._memory_v2 = hasattr(pynvml, "nvmlMemory_v2")
        self._lock = threading.Lock()
        self._closed = False

    @property
    def driver(self) -> str:
        return self._driver

    @property
    def device_count(self) -> int:
        return self._count

    def snapshot(self) -> GpuSnapshot:
        """Read every GPU now (thread-safe: the heartbeat and the job monitor may both call)."""
        with self._lock:
            if self._closed:
                raise GpuProbeError("NvmlProbe.snapshot() after close()")
            devices = tuple(self._read_device(i) for i in range(self._count))
        return GpuSnapshot(devices=devices, taken_at=time.time(), driver=self._driver)

    def close(self) -> None:
        """Shut NVML down once; later calls do nothing."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._handles.clear()
                self._shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one device ---------------------------------------------------------------------

    def _read_device(self, index: int) -> GpuDevice:
        nvml = self._nvml
        try:
            return self._read_healthy(index)
        except nvml.NVMLError as exc:
            if getattr(exc, "value", None) == nvml.NVML_ERROR_GPU_IS_LOST:
                self._handles.pop(index, None)  # re-acquire when it comes back
            return self._unhealthy(index, f"NVML: {exc}")
        except nvml.NVMLLibraryMismatchError as exc:
            return self._unhealthy(index, f"NVML library mismatch: {exc}")
        except Exception as exc:  # a driver oddity must not stop the heartbeat
            self._handles.pop(index, None)
            return self._unhealthy(index, f"unexpected {type(exc).__name__}: {exc}")

    def _read_healthy(self, index: int) -> GpuDevice:
        nvml = self._nvml
        handle = self._handles.get(index)
        if handle is None:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            self._handles[index] = handle
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        name = _text(nvml.nvmlDeviceGetName(handle))
        total, free, used = self._memory(handle)
        self._known[index] = _Known(uuid=uuid, name=name, total=total)
        return GpuDevice(
            index=index,
            uuid=uuid,
            name=name,
            total_bytes=total,
            free_bytes=free,
            used_bytes=used,
            utilization_pct=self._utilization(handle),
            processes=self._processes(handle),
        )

    def _memory(self, handle: Any) -> tuple[int, int, int]:
        nvml = self._nvml
        if self._memory_v2:
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
                return int(mem.total) - int(mem.reserved), int(mem.free), int(mem.used)
            except nvml.NVMLError as exc:
                # Drivers before 510 lack the v2 call (FUNCTION_NOT_FOUND) or the struct
                # version (ARGUMENT_VERSION_MISMATCH / NOT_SUPPORTED): fall back for good.
                if getattr(exc, "value", None) not in _v2_unsupported_codes(nvml):
                    raise
                self._memory_v2 = False
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(mem.total), int(mem.free), int(mem.used)

    def _utilization(self, handle: Any) -> int | None:
        nvml = self._nvml
        try:
            return int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError_NotSupported:
            return None  # e.g. MIG instances, some vGPUs

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        """Compute and graphics processes, merged by pid (one process can be in both lists)."""
        nvml = self._nvml
        usage: dict[int, int] = {}
        for unversioned, v2 in (
            ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"),
            ("nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses_v2"),
        ):
            try:
                try:
                    procs = getattr(nvml, unversioned)(handle)
                except nvml.NVMLLibraryMismatchError:  # older driver: no _v3 entry point
                    procs = getattr(nvml, v2)(handle)
            except nvml.NVMLError_NotSupported:
                continue
            for proc in procs:
                used = proc.usedGpuMemory
                used_bytes = int(used) if used is not None else 0  # None: not available (MIG, WDDM)
                pid = int(proc.pid)
                usage[pid] = max(usage.get(pid, 0), used_bytes)
        return tuple(GpuProcess(pid=pid, used_bytes=used) for pid, used in sorted(usage.items()))

    def _unhealthy(self, index: int, error: str) -> GpuDevice:
        known = self._known.get(index)
        return GpuDevice(
            index=index,
            uuid=known.uuid if known else f"GPU-unknown-{index}",
            name=known.name if known else "unknown",
            total_bytes=known.total if known else 0,
            free_bytes=0,  # nothing is placeable on a GPU we cannot read
            used_bytes=0,
            utilization_pct=None,
            processes=(),
            healthy=False,
            error=error,
        )

    def _shutdown(self) -> None:
        with contextlib.suppress(Exception):  # nothing useful to do when shutdown fails
            self._nvml.nvmlShutdown()


def _v2_unsupported_codes(nvml: Any) -> set[int]:
    """Error codes meaning "this driver has no v2 memory info" (the newest code only in newer bindings)."""
    codes = {nvml.NVML_ERROR_FUNCTION_NOT_FOUND, nvml.NVML_ERROR_NOT_SUPPORTED}
    mismatch = getattr(nvml, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", None)
    if mismatch is not None:
        codes.add(mismatch)
    return codes


def _text(value: str | bytes) -> str:
    """pynvml returns str on Python 3, but older bindings returned bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)

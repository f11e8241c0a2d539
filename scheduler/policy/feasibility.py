"""Could any node ever run this job? Pure; used by placement (reason Infeasible) and by the
API at submit (an impossible request is refused there, before anything is stored)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.sizes import format_size
from scheduler.policy.accounting import GpuAccount


@dataclass(frozen=True)
class Shape:
    gpus: int
    mem_bytes: int | None
    exclusive: bool = False
    node: str = ""
    gpu_model: str = ""


class Feasibility:
    """Answers `why_never` for many jobs against one set of accounts, with a cache per shape."""

    def __init__(self, accounts: dict[str, list[GpuAccount]], headroom_bytes: int) -> None:
        self.accounts = accounts
        self.headroom = headroom_bytes
        # Per node, what each GPU could ever offer one job, largest first.
        self._caps = {n: sorted((g.total - headroom_bytes for g in gs), reverse=True) for n, gs in accounts.items()}
        self._cache: dict[Shape, str | None] = {}

    def why_never(self, shape: Shape) -> str | None:
        """Why no node in the accounts could ever run `shape`; None when one could (or when
        the job names a node that is not online, which may come later)."""
        if shape not in self._cache:
            self._cache[shape] = self._compute(shape)
        return self._cache[shape]

    def _compute(self, shape: Shape) -> str | None:
        if shape.node and shape.node not in self.accounts:
            return None
        need = shape.mem_bytes or 0
        k = shape.gpus
        if not shape.gpu_model:
            names = [shape.node] if shape.node else list(self._caps)
            if any(len(self._caps[n]) >= k and self._caps[n][k - 1] >= need for n in names):
                return None
            caps = {n: self._caps[n] for n in names}
        else:
            model = shape.gpu_model.lower()
            caps = {
                n: sorted((g.total - self.headroom for g in gs if model in g.name.lower()), reverse=True)
                for n, gs in self.accounts.items()
                if not shape.node or n == shape.node
            }
            if not any(caps.values()):
                where = f" on node {shape.node}" if shape.node else ""
                return f"no GPU{where} matches --gpu-model '{shape.gpu_model}'"
            if any(len(c) >= k and c[k - 1] >= need for c in caps.values()):
                return None
        most = max((len(c) for c in caps.values()), default=0)
        if most < k:
            which = f"node {shape.node} has" if shape.node else "the largest node has"
            return f"needs {k} GPUs on one node; {which} {most}"
        biggest = max((c[0] for c in caps.values() if c), default=0)
        if need > biggest:
            return f"needs {format_size(need)} per GPU; the largest GPU offers {format_size(max(0, biggest))}"
        return f"needs {k} GPUs with {format_size(need)} each on one node; no node has that many"

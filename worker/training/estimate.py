"""``python -P -m worker.training.estimate [--context-bytes N] [--measure] FACTORY [--amp M] [-- ARGS...]``

The peak GPU memory of one training step of a built-in-loop job, estimated before it runs,
without a GPU: the user's factory builds its model, optimizer and loaders as usual (on the
CPU), the first batch is taken, and then one full step (forward, loss, backward, optimizer
step, twice: the optimizer's state exists only after the first) is traced on fake CPU tensors
(``FakeTensorMode``: shapes and dtypes, no data, no compute) under PyTorch's ``MemTracker``,
which records the peak of parameters, gradients, optimizer state, activations and
temporaries. The CUDA context (what the allocator never sees) is added. Fake CUDA tensors
would need a CUDA build; fake CPU tensors have the same sizes.

Prints one JSON line: ``{"estimate_bytes", "step_peak_bytes", "context_bytes", ...}``.
``--measure`` also runs the same step for real on the CPU under ``MemTracker`` and reports
``measured_step_peak_bytes``: what the tests compare the estimate with on a CPU machine
(``scripts/gpu-check`` compares with the allocator's real peak on a GPU).

What it does not see: the caching allocator's rounding and fragmentation, cuDNN/cuBLAS
workspaces, autocast copies (``--amp`` is not traced), and anything the factory does
outside the model (data on the GPU). The gap is what `[memory] auto_margin` is for, and the
learned profile replaces the estimate after the first runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from worker.training.batches import split_batch
from worker.training.factory import FactoryError, TrainSpec, build_spec
from worker.training.status import USAGE_EXIT_CODE

TRACED_STEPS = 2  # the optimizer's state (Adam: 2x the parameters) appears in the first step


def _optimizer(spec: TrainSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The factory's optimizer for `model`'s parameters, stepping as it would on a GPU: with
    `foreach` left to PyTorch, CUDA parameters take the multi-tensor path (temporaries for
    all parameters at once) and CPU ones the per-parameter loop, so it is set here."""
    opt = spec.optimizer
    if isinstance(opt, torch.optim.Optimizer):  # built for the real parameters: rebuild alike
        built = type(opt)(model.parameters(), **opt.defaults)
    else:
        built = opt(model.parameters())
    if not isinstance(built, torch.optim.Optimizer):
        raise FactoryError("the factory's optimizer callable did not return a torch.optim.Optimizer")
    for group in built.param_groups:
        if "foreach" in group and group["foreach"] is None:
            group["foreach"] = True
    return built


def _step_peak(model: torch.nn.Module, spec: TrainSpec, x: Any, y: Any) -> int:
    """The tracked peak (bytes, every device together) of TRACED_STEPS training steps."""
    optimizer = _optimizer(spec, model)
    loss_fn = spec.loss_fn or torch.nn.CrossEntropyLoss()
    tracker = MemTracker()
    tracker.track_external(model, optimizer, *(t for t in (x, y) if isinstance(t, torch.Tensor)))
    with tracker:
        for _ in range(TRACED_STEPS):
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            tracker.reset_mod_stats()  # per-module stats of the last step only; the peak stays
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(stats.get("Total", 0) for stats in peak.values()))


def estimate(spec: TrainSpec, *, measure: bool = False) -> dict[str, int]:
    """Trace one step of `spec` on fake tensors; with `measure`, also run it for real on the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = next(iter(spec.train_loader))
    x, y = split_batch(batch)
    model = spec.model.to("cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    convert = mode.from_tensor
    fake_model = copy.deepcopy(model)
    for module in fake_model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(convert(param.detach()), requires_grad=param.requires_grad))
        for name, buf in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, convert(buf))
    fake_x = _map(x, convert)
    fake_y = _map(y, convert)
    with mode:
        step_peak = _step_peak(fake_model, spec, fake_x, fake_y)
    result = {"step_peak_bytes": step_peak}
    if measure:
        result["measured_step_peak_bytes"] = _step_peak(copy.deepcopy(model), spec, x, y)
    return result


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list | tuple):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)
    own, factory_args = args[:cut], args[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m worker.training.estimate")
    parser.add_argument("factory")
    parser.add_argument("--context-bytes", type=int, default=0)
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--amp", default="off")  # accepted (the loop's), not traced
    ns, _loop_options = parser.parse_known_args(own)
    started = time.monotonic()
    torch.manual_seed(0)
    try:
        spec = build_spec(ns.factory, factory_args)
        result = estimate(spec, measure=ns.measure)
    except FactoryError as exc:
        print(f"gpulab estimate: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except Exception as exc:  # the user's model may not trace: say why, the job gets a whole GPU
        print(f"gpulab estimate: cannot trace a step: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        return 1
    result["context_bytes"] = max(0, ns.context_bytes)
    result["estimate_bytes"] = result["step_peak_bytes"] + result["context_bytes"]
    result["seconds"] = round(time.monotonic() - started, 3)  # type: ignore[assignment]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

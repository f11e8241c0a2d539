"""What the loop assumes about a batch, in one place, and the end-of-run evaluation.

A batch is an ``(inputs, targets)`` pair whose tensors may be nested in lists, tuples or
dicts; the loop moves it to the device and calls ``loss_fn(model(inputs), targets)``.
Factories with other shapes wrap their dataset's ``collate_fn`` to produce that pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch


def to_device(obj: Any, device: torch.device, non_blocking: bool) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def split_batch(batch: Any) -> tuple[Any, Any]:
    """A batch is ``(inputs, targets)``; anything else is the factory's bug, said plainly."""
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"train/eval batches must be (inputs, targets) pairs; got {type(batch).__name__}")


def batch_size(x: Any, y: Any) -> int:
    """Samples in a batch: the first dimension of the targets (or inputs), for samples/s."""
    for t in (y, x):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return 1


def _is_classification(out: Any, y: Any) -> bool:
    """Logits ``[N, C, ...]`` against integer class indices ``[N]``: accuracy makes sense."""
    return (
        isinstance(out, torch.Tensor)
        and isinstance(y, torch.Tensor)
        and out.dim() >= 2
        and y.dim() == 1
        and not y.is_floating_point()
    )


def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[[Any, Any], Any],
    device: torch.device,
    non_blocking: bool = False,
) -> dict[str, Any]:
    """Mean loss over ``loader`` and, for classification, accuracy (``test_accuracy``)."""
    model.eval()
    loss_sum, correct, count, classified = 0.0, 0, 0, True
    try:
        with torch.inference_mode():
            for batch in loader:
                x, y = split_batch(to_device(batch, device, non_blocking))
                out = model(x)
                n = batch_size(x, y)
                loss_sum += float(loss_fn(out, y).float()) * n
                count += n
                if _is_classification(out, y):
                    correct += int((out.argmax(dim=1) == y).sum())
                else:
                    classified = False
    finally:
        model.train()
    if count == 0:
        return {}
    metrics: dict[str, Any] = {"test_loss": loss_sum / count, "test_samples": count}
    if classified:
        metrics["test_accuracy"] = correct / count
    return metrics

"""Finding the user's factory and turning what it returns into a :class:`TrainSpec`.

The loop owns the mechanics (device, AMP, checkpoints, signals, progress); the user owns
the model and the data. The boundary is one function, ``build(args) -> TrainSpec | dict``,
so a user script needs no gpulab base class and stays runnable on its own.

This module does not import torch at module level: ``worker.training`` re-exports
:class:`TrainSpec`, and the worker must be able to import the package's constants without
pulling torch into a daemon.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

SCHEDULER_INTERVALS = ("epoch", "step")


class FactoryError(Exception):
    """The factory could not be found, called, or returned something unusable (exit 2)."""


@dataclass
class TrainSpec:
    """What a factory returns: the user's half of a training run.

    Attributes:
        model: a ``torch.nn.Module``; the loop moves it to the job's device.
        train_loader: a ``torch.utils.data.DataLoader`` (or any iterable of ``(x, y)``
            batches). For a DataLoader the loop reseeds its sampler every epoch so that
            shuffling is reproducible and a resumed epoch sees exactly the remaining batches.
        optimizer: an optimizer instance, or a callable ``params -> optimizer`` (called
            after the model is on its device).
        lr_scheduler: optional; an instance or a callable ``optimizer -> scheduler``.
        scheduler_interval: ``"epoch"`` (default, PyTorch's convention) or ``"step"``
            (per optimizer step, e.g. OneCycleLR).
        loss_fn: ``(output, target) -> loss``; default ``torch.nn.CrossEntropyLoss()``.
        eval_loader: optional; at the end the loop reports loss and accuracy on it.
        epochs: default number of epochs when ``--epochs`` is not given.
    """

    model: Any
    train_loader: Any
    optimizer: Any
    lr_scheduler: Any = None
    scheduler_interval: str = "epoch"
    loss_fn: Callable[[Any, Any], Any] | None = None
    eval_loader: Any = None
    epochs: int | None = None


def _split_ref(ref: str) -> tuple[str, str | None]:
    """``a/b.py:fn`` -> (``a/b.py``, ``fn``); a Windows-free world, so the last ``:`` splits."""
    if ":" in ref:
        target, func = ref.rsplit(":", 1)
        return target, (func or None)
    return ref, None


def _is_path(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or target.startswith(".")


def load_factory(ref: str) -> Callable[[list[str]], Any]:
    """Resolve ``path/to/file.py``, ``path/to/file.py:func`` or ``package.module:func``.

    A file's directory goes first on ``sys.path`` so the script can import its siblings,
    as it could when run as ``python file.py``.
    """
    target, func_name = _split_ref(ref)
    if not target:
        raise FactoryError(f"factory {ref!r}: expected path/to/file.py[:func] or package.module:func")
    if _is_path(target):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise FactoryError(f"factory {ref!r}: no such file {path}")
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        mod_name = "gpulab_factory_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise FactoryError(f"factory {ref!r}: cannot load {path} as a module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    else:
        if func_name is None:
            raise FactoryError(f"factory {ref!r}: a module needs a function, as package.module:func")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise FactoryError(f"factory {ref!r}: {exc}") from exc
    name = func_name or "build"
    func = getattr(module, name, None)
    if not callable(func):
        raise FactoryError(f"factory {ref!r}: {target} has no callable {name!r}")
    return func  # type: ignore[no-any-return]  # checked callable; the user's code is untyped


def coerce_spec(obj: Any) -> TrainSpec:
    """Accept a :class:`TrainSpec`, a mapping, or any object with the same attributes."""
    if isinstance(obj, TrainSpec):
        spec = obj
    else:
        names = [f.name for f in fields(TrainSpec)]
        if isinstance(obj, Mapping):
            unknown = sorted(set(obj) - set(names))
            if unknown:
                raise FactoryError(f"factory returned unknown keys {unknown}; accepted: {names}")
            values = dict(obj)
        else:
            values = {n: getattr(obj, n) for n in names if hasattr(obj, n)}
        missing = [n for n in ("model", "train_loader", "optimizer") if values.get(n) is None]
        if missing:
            raise FactoryError(f"factory result lacks {missing} (needs model, train_loader, optimizer)")
        spec = TrainSpec(**values)
    if spec.scheduler_interval not in SCHEDULER_INTERVALS:
        raise FactoryError(f"scheduler_interval={spec.scheduler_interval!r}; accepted: {list(SCHEDULER_INTERVALS)}")
    if spec.epochs is not None and int(spec.epochs) < 1:
        raise FactoryError(f"epochs={spec.epochs}; must be >= 1")
    return spec


def build_spec(ref: str, args: list[str]) -> TrainSpec:
    """Load the factory named by ``ref`` and call it with the user's arguments."""
    factory = load_factory(ref)
    return coerce_spec(factory(list(args)))

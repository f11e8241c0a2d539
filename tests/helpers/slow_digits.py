"""examples/digits.py with a per-step delay (SLOW_STEP_S, seconds) so a test can catch the
run mid-way. The delay changes no number: the loss curve is the example's own."""

from __future__ import annotations

import os
import time
from pathlib import Path

from worker.training import TrainSpec
from worker.training.factory import load_factory

_digits = load_factory(str(Path(__file__).resolve().parents[2] / "examples" / "digits.py"))


def build(args: list[str]) -> TrainSpec:
    spec = _digits(args)
    delay = float(os.environ.get("SLOW_STEP_S", "0"))
    if delay:
        spec.model.register_forward_pre_hook(lambda module, inputs: time.sleep(delay))
    return spec

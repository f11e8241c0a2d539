"""The pre-run estimate (worker/training/estimate.py) on the CPU: the trace on fake tensors
must match one real step tracked on real CPU tensors, and failures must be one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_fake_trace_matches_a_real_cpu_step_and_adds_the_context(capsys: pytest.CaptureFixture[str]) -> None:
    from worker.training.estimate import main

    digits = str(ROOT / "examples" / "digits.py")
    assert main(["--measure", "--context-bytes", "1000", digits, "--", "--batch", "64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step_peak_bytes"] > 0
    assert result["step_peak_bytes"] == result["measured_step_peak_bytes"]
    assert result["estimate_bytes"] == result["step_peak_bytes"] + 1000


def test_a_bigger_batch_estimates_more() -> None:
    from worker.training.estimate import estimate
    from worker.training.factory import build_spec

    small = estimate(build_spec(str(ROOT / "examples" / "digits.py"), ["--batch", "16", "--hidden", "512"]))
    large = estimate(build_spec(str(ROOT / "examples" / "digits.py"), ["--batch", "512", "--hidden", "512"]))
    assert large["step_peak_bytes"] > small["step_peak_bytes"]


def test_a_broken_factory_is_one_line_and_no_estimate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.training.estimate import main

    bad = tmp_path / "bad.py"
    bad.write_text("def build(args):\n    raise RuntimeError('no data here')\n")
    assert main([str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "cannot trace a step: RuntimeError: no data here" in captured.err
    assert main([str(tmp_path / "missing.py")]) == 2

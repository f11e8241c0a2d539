"""The built-in training loop, end to end on CPU.

The subprocess tests run ``python -m worker.training`` exactly as the worker does (env vars
for the checkpoint dir, status file, attempt), kill it, and resume it: the property that
matters is that a requeued job ends where an uninterrupted one would have. A test factory
wraps examples/digits.py with a per-step sleep so there is time to kill it mid-run; the
sleep does not change any number. The in-process tests cover the smaller contracts
(accumulation, AMP fallback, OOM exit code, factory forms) without paying for a new
interpreter each.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from worker.training.checkpoint import checkpoint_name  # noqa: E402
from worker.training.data import epoch_batches  # noqa: E402
from worker.training.device import CONTEXT_ALLOWANCE_BYTES, memory_fraction  # noqa: E402
from worker.training.runner import RunConfig, run  # noqa: E402
from worker.training.status import OOM_EXIT_CODE, SIGTERM_EXIT_CODE  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits.py"
REQUIRED_ACCURACY = 0.95
STATUS_KEYS = {
    "kind",
    "epoch",
    "epochs",
    "step",
    "steps_total",
    "loss",
    "samples_per_s",
    "eta_s",
    "updated_at",
    "final",
    "metrics",
    "oom",
    "peak_bytes",
    "resumed_from_step",
}

SLOW_FACTORY = f"""
import os, time
from worker.training.factory import load_factory

_digits = load_factory({str(DIGITS)!r})

def build(args):
    spec = _digits(args)
    delay = float(os.environ.get("SLOW_STEP_S", "0"))
    if delay:
        spec.model.register_forward_pre_hook(lambda module, inputs: time.sleep(delay))
    return spec
"""


def _env(tmp: Path, attempt: int = 1, slow: float = 0.0) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=str(REPO),
        GPULAB_JOB_ID="7",
        GPULAB_ATTEMPT=str(attempt),
        GPULAB_CHECKPOINT_DIR=str(tmp / "ckpt"),
        GPULAB_STATUS_FILE=str(tmp / "status.json"),
        SLOW_STEP_S=str(slow),
    )
    return env


def _status(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "status.json").read_text())


def _train(tmp: Path, factory: str, *args: str, attempt: int = 1) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.training", factory, *args],
        cwd=REPO,
        env=_env(tmp, attempt),
        capture_output=True,
        text=True,
        timeout=180,
    )


def _start_slow(tmp: Path, *args: str) -> subprocess.Popen[str]:
    factory = tmp / "slow_digits.py"
    factory.write_text(SLOW_FACTORY)
    with (tmp / "slow.stderr").open("w") as err:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            [sys.executable, "-m", "worker.training", str(factory), *args],
            cwd=REPO,
            env=_env(tmp, slow=0.01),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )


def _await_step(tmp: Path, proc: subprocess.Popen[str], min_step: int, deadline_s: float = 90) -> int:
    """Poll the status file until it shows ``min_step``; fail if the run ends first."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended (rc={proc.returncode}) before step {min_step}"
        try:
            step = int(_status(tmp)["step"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            step = -1
        if step >= min_step:
            return step
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no status with step >= {min_step} within {deadline_s}s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run of examples/digits.py with its default epochs (seed 0)."""
    tmp = tmp_path_factory.mktemp("reference")
    done = _train(tmp, str(DIGITS), "--seed", "0")
    assert done.returncode == 0, done.stderr
    return _status(tmp)


def _assert_same_result(status: dict[str, Any], reference: dict[str, Any]) -> None:
    assert status["final"] is True and status["state"] == "completed"
    assert status["step"] == reference["step"]
    got, want = status["metrics"]["final_loss"], reference["metrics"]["final_loss"]
    assert math.isclose(got, want, rel_tol=1e-5), (got, want)
    assert status["metrics"]["test_accuracy"] == pytest.approx(reference["metrics"]["test_accuracy"])


def test_digits_example_reaches_stated_accuracy(reference: dict[str, Any]) -> None:
    assert set(reference) >= STATUS_KEYS
    assert reference["kind"] == "training" and reference["final"] is True and reference["oom"] is False
    assert reference["step"] == reference["steps_total"] == 20 * 45
    assert reference["epoch"] == reference["epochs"] == 20
    assert reference["peak_bytes"] is None and reference["resumed_from_step"] is None
    assert reference["metrics"]["test_accuracy"] >= REQUIRED_ACCURACY


def test_kill9_then_resume_matches_uninterrupted_run(tmp_path: Path, reference: dict[str, Any]) -> None:
    proc = _start_slow(tmp_path, "--checkpoint-every-steps", "7", "--keep", "3")
    _await_step(tmp_path, proc, 30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    steps = sorted(int(p.name[5:14]) for p in (tmp_path / "ckpt").glob("ckpt-*.pt"))
    assert len(steps) >= 2 and all(s % 7 == 0 for s in steps)
    # A power cut mid-write: the newest file is truncated. The resume must fall back.
    newest = tmp_path / "ckpt" / checkpoint_name(steps[-1])
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])

    done = _train(tmp_path, str(DIGITS), "--checkpoint-every-steps", "7", "--keep", "3", attempt=2)
    assert done.returncode == 0, done.stderr
    assert "skipping unreadable checkpoint" in done.stderr
    status = _status(tmp_path)
    assert status["resumed_from_step"] == steps[-2] > 0
    assert status["attempt"] == 2
    _assert_same_result(status, reference)


def test_sigterm_checkpoints_exits_143_and_resumes(tmp_path: Path, reference: dict[str, Any]) -> None:
    proc = _start_slow(tmp_path, "--checkpoint-every-steps", "0", "--checkpoint-every-min", "0")
    _await_step(tmp_path, proc, 30)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    stderr = (tmp_path / "slow.stderr").read_text()
    assert proc.returncode == SIGTERM_EXIT_CODE, stderr
    assert "stopped by SIGTERM" in stderr
    stopped = _status(tmp_path)
    assert stopped["state"] == "stopped" and stopped["final"] is False
    assert [p.name for p in (tmp_path / "ckpt").glob("ckpt-*.pt")] == [checkpoint_name(stopped["step"])]

    done = _train(tmp_path, str(DIGITS), attempt=2)
    assert done.returncode == 0, done.stderr
    status = _status(tmp_path)
    assert status["resumed_from_step"] == stopped["step"]
    _assert_same_result(status, reference)


# ---- in-process: small contracts -------------------------------------------------------

TINY_FACTORY = """
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

class Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y
    def __iter__(self):
        return iter(zip(self.x, self.y))

def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return x, (x.sum(dim=1) > 0).long()

def build(args):
    x, y = _data()
    batch = int(args[0]) if args else 16
    return {
        "model": torch.nn.Linear(4, 2),
        "train_loader": DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True),
        "eval_loader": DataLoader(TensorDataset(x, y), batch_size=64),
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.1),
    }

def build_stream(args):
    x, y = _data()
    spec = build(args)
    spec["train_loader"] = DataLoader(Stream(x, y), batch_size=16)
    return spec

def build_oom(args):
    spec = build(args)
    def boom(module, inputs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    spec["model"].register_forward_pre_hook(boom)
    return spec

def build_bad(args):
    return {"model": torch.nn.Linear(4, 2)}
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(TINY_FACTORY)
    return path


def _run(tmp: Path, factory: str, *factory_args: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    cfg = RunConfig(
        factory=factory,
        factory_args=list(factory_args),
        checkpoint_dir=str(tmp / "ck"),
        status_file=str(tmp / "st.json"),
        device="cpu",
        **kw,
    )
    rc = run(cfg)
    return rc, json.loads((tmp / "st.json").read_text())


def _final_weight(tmp: Path) -> Any:
    ckpts = sorted((tmp / "ck").glob("ckpt-*.pt"))
    return torch.load(ckpts[-1], weights_only=False)["model"]["weight"]


def test_gradient_accumulation_equals_one_big_batch(tiny: Path, tmp_path: Path) -> None:
    rc, st = _run(tmp_path / "a", str(tiny), "32", epochs=2)
    assert rc == 0 and st["step"] == st["steps_total"] == 4
    rc, st2 = _run(tmp_path / "b", str(tiny), "16", epochs=2, accum=2)
    assert rc == 0 and st2["step"] == st2["steps_total"] == 4
    assert torch.allclose(_final_weight(tmp_path / "a"), _final_weight(tmp_path / "b"), atol=1e-6)
    assert st2["metrics"]["final_loss"] == pytest.approx(st["metrics"]["final_loss"], rel=1e-5)


def test_uneven_accumulation_steps_on_the_epoch_tail(tiny: Path, tmp_path: Path) -> None:
    rc, st = _run(tmp_path, str(tiny), "16", epochs=1, accum=3)  # 4 batches -> groups 3 + 1
    assert rc == 0 and st["step"] == st["steps_total"] == 2


def test_amp_bf16_and_fp16_fallback_on_cpu(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, st = _run(tmp_path / "bf16", str(tiny), epochs=1, amp="bf16")
    assert rc == 0 and st["final"]
    rc, st = _run(tmp_path / "fp16", str(tiny), epochs=1, amp="fp16")
    assert rc == 0 and st["final"]
    assert "falling back to bf16" in capsys.readouterr().err


def test_iterable_without_length_has_no_eta(tiny: Path, tmp_path: Path) -> None:
    rc, st = _run(tmp_path, f"{tiny}:build_stream", epochs=2)
    assert rc == 0 and st["final"] and st["step"] == 8
    assert st["steps_total"] is None and st["eta_s"] == 0.0


def test_cuda_oom_exits_75_with_oom_status(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, st = _run(tmp_path, f"{tiny}:build_oom", epochs=1)
    assert rc == OOM_EXIT_CODE == 75
    assert st["oom"] is True and st["state"] == "oom" and st["final"] is False
    assert st["peak_bytes"] is None  # CPU: no CUDA allocator to read
    assert "CUDA out of memory" in capsys.readouterr().err


def test_bad_factories_exit_2(tiny: Path, tmp_path: Path) -> None:
    assert run(RunConfig(factory=f"{tiny}:build_bad", checkpoint_dir=str(tmp_path))) == 2
    assert run(RunConfig(factory=f"{tiny}:nope", checkpoint_dir=str(tmp_path))) == 2
    assert run(RunConfig(factory=str(tmp_path / "missing.py"), checkpoint_dir=str(tmp_path))) == 2
    assert run(RunConfig(factory="no_such_package.mod:build", checkpoint_dir=str(tmp_path))) == 2


def test_module_factory_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pkg_gpulab_test").mkdir()
    (tmp_path / "pkg_gpulab_test" / "__init__.py").write_text("")
    (tmp_path / "pkg_gpulab_test" / "fac.py").write_text(TINY_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, st = _run(tmp_path, "pkg_gpulab_test.fac:build", epochs=1)
    assert rc == 0 and st["metrics"]["test_accuracy"] is not None


def test_resumed_epoch_skips_exactly_the_consumed_batches() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.arange(50)), batch_size=8, shuffle=True)

    def ids(it: Iterator[Any]) -> list[list[int]]:
        return [b[0].tolist() for b in it]

    full = ids(epoch_batches(loader, seed=3, epoch=2))
    assert ids(epoch_batches(loader, seed=3, epoch=2, skip=4)) == full[4:]
    assert full != ids(epoch_batches(loader, seed=3, epoch=3))  # each epoch reshuffles
    assert sorted(i for batch in full for i in batch) == list(range(50))


def test_memory_fraction_leaves_room_for_the_cuda_context() -> None:
    gib = 1024**3
    assert memory_fraction(12 * gib, 80 * gib) == pytest.approx((12 * gib - CONTEXT_ALLOWANCE_BYTES) / (80 * gib))
    assert memory_fraction(200 * gib, 80 * gib) == 1.0
    assert 0 < memory_fraction(100 * 1024**2, 80 * gib) < 0.01

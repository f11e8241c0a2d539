"""``python -m worker.training FACTORY [options] [-- FACTORY_ARGS...]``.

Everything before ``--`` is the loop's; everything after goes to the factory untouched, so
the two never fight over option names. The worker's ``GPULAB_*`` variables fill in the
checkpoint directory, status file, job id and attempt (see ``worker/training/runner.py``).
"""

from __future__ import annotations

import argparse
import sys

from worker.training.device import AMP_MODES
from worker.training.runner import DEFAULT_CHECKPOINT_DIR, RunConfig, run
from worker.training.status import USAGE_EXIT_CODE


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The loop's own options (not the factory's)."""
    p = argparse.ArgumentParser(
        prog="python -m worker.training",
        description="gpulab's built-in PyTorch training loop: checkpoints, resumes, reports progress.",
        epilog="Arguments after -- are passed to the factory's build(args).",
    )
    p.add_argument("factory", help="path/to/file.py (uses build), path/to/file.py:func, or package.module:func")
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="epochs to train (default: the factory's TrainSpec.epochs, else 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for model init, shuffling and RNGs (default 0)")
    p.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="off",
        help="autocast precision; fp16 uses a GradScaler on CUDA and falls back to bf16 on CPU",
    )
    p.add_argument("--accum", type=_positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument(
        "--checkpoint-every-steps",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="checkpoint every N optimizer steps (0: off; default 0)",
    )
    p.add_argument(
        "--checkpoint-every-min",
        type=_non_negative_float,
        default=10.0,
        metavar="M",
        help="checkpoint every M minutes of training (0: off; default 10)",
    )
    p.add_argument("--keep", type=_positive_int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the first GPU in CUDA_VISIBLE_DEVICES, CPU when it is unset or empty",
    )
    p.add_argument(
        "--no-resume", dest="resume", action="store_false", help="ignore existing checkpoints and start from scratch"
    )
    return p


def parse_args(argv: list[str]) -> RunConfig:
    """Split at the first ``--`` and resolve the loop's options plus the environment."""
    if "--" in argv:
        cut = argv.index("--")
        own, factory_args = argv[:cut], argv[cut + 1 :]
    else:
        own, factory_args = argv, []
    ns = build_parser().parse_args(own)
    cfg = RunConfig(
        factory=ns.factory,
        factory_args=factory_args,
        epochs=ns.epochs,
        seed=ns.seed,
        amp=ns.amp,
        accum=ns.accum,
        checkpoint_every_steps=ns.checkpoint_every_steps,
        checkpoint_every_min=ns.checkpoint_every_min,
        keep=ns.keep,
        device=ns.device,
        resume=ns.resume,
        checkpoint_dir=DEFAULT_CHECKPOINT_DIR,
    )
    return cfg.with_env()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (argparse exits 2 itself on bad options)."""
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"gpulab training: error: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())

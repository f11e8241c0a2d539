"""The argv of a built-in training loop job, shared by `gpulab train` and the Python API so the
two run exactly the same command.

`-P`: the job's cwd is not put first on sys.path, so nothing in the user's project can shadow
gpulab's own modules (the loop adds the cwd at the end of the path to import the factory).
"""

from __future__ import annotations

from pathlib import Path


def resolve_factory(factory: str) -> str:
    """A factory file becomes an absolute path (the job may run elsewhere in the tree); a
    module:func stays as it is. Raises FileNotFoundError for a missing file."""
    if factory.endswith(".py") or ".py:" in factory:
        path, _, func = factory.partition(":")
        if not Path(path).is_file():
            raise FileNotFoundError(path)
        return str(Path(path).resolve()) + (f":{func}" if func else "")
    return factory


def training_argv(
    python: str, factory: str, loop_args: list[str], factory_args: tuple[str, ...] | list[str], gpus: int = 1
) -> tuple[str, ...]:
    """`python -P -m worker.training FACTORY LOOP_ARGS -- FACTORY_ARGS`; with `gpus` > 1 the same
    under `torchrun --standalone --nproc-per-node GPUS` (DDP on one node, one process per GPU;
    `--standalone` picks a free local rendezvous port, so several such jobs share a node)."""
    loop = (python, "-P", "-m", "worker.training", factory, *loop_args, "--", *factory_args)
    if gpus <= 1:
        return loop
    torchrun = (python, "-P", "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}")
    return (*torchrun, "--no-python", *loop)


def factory_stem(factory: str) -> str:
    """The default job name: the factory file's (or module's) stem."""
    return Path(factory.split(":")[0]).stem

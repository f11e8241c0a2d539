"""`python -m gpulab.submitit_job FOLDER`: the command of a gpulab job submitted through submitit.

It runs as the job's owner under gpulab's shim, like any job: it loads the pickled call that
the caller wrote into FOLDER (only if that file is the owner's and nobody else may write it:
see gpulab/submitit_plugin.py), runs it, and pickles ("success", result) or ("error",
traceback) next to it for the caller, as submitit's own runner does. Exit code 0 on success,
1 when the call raised or could not be loaded (gpulab then shows FAILED ExitCode).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

from gpulab.submitit_plugin import _PICKLE_WAIT_S, load_owned_pickle


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m gpulab.submitit_job FOLDER", file=sys.stderr)
        return 2
    os.umask(0o077)  # the result pickle is the caller's code to load: nobody else may write it
    folder = argv[0]
    os.environ["SUBMITIT_FOLDER"] = folder
    os.environ.setdefault("SUBMITIT_EXECUTOR", "gpulab")
    from submitit.core import utils  # the job's own process: submitit is the user's dependency

    paths = utils.JobPaths(folder, job_id=os.environ["GPULAB_JOB_ID"], task_id=0)
    deadline = time.monotonic() + _PICKLE_WAIT_S
    while not paths.submitted_pickle.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the caller moves the pickle in right after the submit answered
    try:
        delayed = load_owned_pickle(paths.submitted_pickle)
        if type(delayed).__name__ != "DelayedSubmission":
            raise TypeError(f"{paths.submitted_pickle} holds a {type(delayed).__name__}, not a submitit call")
        result = delayed.result()
    except Exception:
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        _dump(paths.result_pickle, ("error", trace))
        return 1
    _dump(paths.result_pickle, ("success", result))
    return 0


def _dump(path: Path, outcome: tuple[str, object]) -> None:
    """Write the outcome under a temporary name and rename it in, so the caller never reads
    half a pickle (submitit's temporary_save_path)."""
    from submitit.core import utils

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    utils.cloudpickle_dump(outcome, tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

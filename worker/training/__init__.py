"""gpulab's built-in PyTorch training loop; runs inside the job's process only.

``python -m worker.training FACTORY [options] [-- FACTORY_ARGS...]`` builds the model and
data from a user factory returning a :class:`TrainSpec`, trains on the GPU the worker
assigned (capped at the job's memory request), checkpoints atomically, resumes after a
requeue, and reports progress through ``GPULAB_STATUS_FILE``.

Importing this package does not import torch (the worker may read the constants below);
the loop's modules do.
"""

from worker.training.factory import TrainSpec
from worker.training.status import OOM_EXIT_CODE, SIGINT_EXIT_CODE, SIGTERM_EXIT_CODE

__all__ = ["OOM_EXIT_CODE", "SIGINT_EXIT_CODE", "SIGTERM_EXIT_CODE", "TrainSpec"]

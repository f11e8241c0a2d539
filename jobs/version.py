"""gpulab's version, as installed (the package metadata), for `gpulab --version` and for
daemons to publish. A source tree that was never installed says so instead of failing."""

from __future__ import annotations

import importlib.metadata

UNKNOWN = "0+unknown"


def gpulab_version() -> str:
    try:
        return importlib.metadata.version("gpulab")
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN


__version__ = gpulab_version()

"""gpulab control plane: daemon loop, placement policy, ledger, API server."""

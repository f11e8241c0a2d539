"""gpulab worker: GPU probes, heartbeat, job runner, training loop. One per GPU host."""

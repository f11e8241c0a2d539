"""gpulab benchmarks: submit->start latency, trace replay, daemon footprint (`python -m bench`)."""

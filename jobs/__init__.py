"""gpulab's job model: spec, states, Redis store, API shapes, client and CLI."""

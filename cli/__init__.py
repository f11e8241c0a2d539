"""gpulab command line: every click command, rendering, `top`, `doctor`, the API client and
the `gpulab up` stack. The only package that may import jobs, scheduler and worker alike."""

"""`python -m cli` runs the gpulab command line."""

from cli.main import run

run()

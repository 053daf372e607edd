"""`python -m rma_ray.cli`: the same as the `rma` command."""

from rma_ray.cli import main

main()

"""`python -m gram_ray ...` is `gram-ray ...` (for machines where the package is on PYTHONPATH, not installed)."""

from gram_ray.cli import main

main(prog_name="gram-ray")

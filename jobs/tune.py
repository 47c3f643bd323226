"""Sweep as a Ray job:

    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune-demo.yaml [--out DIR] [--set k=v]

Attaches to the cluster the job was submitted to (RAY_ADDRESS) and exits non-zero on failure."""

from gram_ray.cli import run_job

if __name__ == "__main__":
    run_job("tune")

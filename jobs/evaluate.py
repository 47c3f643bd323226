"""Evaluate a checkpoint on a Parquet cache as a Ray job:

    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint DIR_OR_URI --data DIR_OR_URI [--json F]

Attaches to the cluster the job was submitted to (RAY_ADDRESS) and exits non-zero on failure."""

from gram_ray.cli import run_job

if __name__ == "__main__":
    run_job("evaluate")

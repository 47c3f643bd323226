"""Build (or continue, or add to) a search index as a Ray job:

    ray job submit --working-dir . -- python jobs/index.py --checkpoint DIR_OR_URI --data DIR_OR_URI \
        --out s3://bucket/indexes/NAME [--workers N] [--dtype float16]

Attaches to the cluster the job was submitted to (RAY_ADDRESS): one embedding actor a worker, on a GPU each when
the cluster has GPUs. Exits non-zero on failure; rerun the same command to continue where it stopped."""

from gram_ray.cli import run_job

if __name__ == "__main__":
    run_job("index")

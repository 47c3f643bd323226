"""Training from a cache larger than Ray's object store, in a process of its own (its own Ray, with a small object
store): `python stream_job.py WORK_DIR OUT_JSON`.

Writes a synthetic cache straight as Parquet (random frames and filterbanks of the demo's shapes, no decoding),
starts Ray with OBJECT_STORE bytes of object store, and trains the demo's model on it for 2 epochs on 2 workers
through gram-ray's own TorchTrainer (build_trainer: the real worker loop), streaming from the Parquet files
(data.materialize: never). While it trains, a thread samples the object store's use (as the raylet reports it)
every 0.2 s. Writes the figures to OUT_JSON.
"""

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

OBJECT_STORE = 100 * 2**20
# 16 cached frame draws a clip (data.video.train_draws; training decodes one a clip an epoch): 262 KB a clip, so
# the cache is 4x the store with few clips to train on (26 steps of 2 workers x 32 clips an epoch; 8 MB files).
DRAWS, ROWS, ROWS_PER_FILE = 16, 1664, 32
WORDS = [f"w{i}" for i in range(500)]


def write_cache(shards: Path, cfg) -> int:
    """ROWS clips of the config's shapes in the cache's Parquet layout; returns the bytes written."""
    from ray.data.extensions import ArrowTensorArray

    from gram_ray.data.parquet_layout import to_parquet_layout

    v, a = cfg.data.video, cfg.data.audio
    rng = np.random.default_rng(0)
    shards.mkdir(parents=True)
    for f, start in enumerate(range(0, ROWS, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, ROWS - start)
        table = pa.table(
            {
                "id": pa.array([f"clip{start + i:05d}" for i in range(n)]),
                "captions": pa.array([[" ".join(rng.choice(WORDS, 8))] for _ in range(n)], pa.list_(pa.string())),
                "frames": ArrowTensorArray.from_numpy(
                    rng.integers(0, 256, (n, DRAWS, v.num_frames, 3, v.size, v.size), dtype=np.uint8)
                ),
                "audio_fbank": ArrowTensorArray.from_numpy(
                    rng.standard_normal((n, a.windows, a.window_frames, a.mel_bins), dtype=np.float32)
                ),
                "has_audio": pa.array(np.ones(n, dtype=bool)),
            }
        )
        pq.write_table(to_parquet_layout(table), shards / f"shard-{f:05d}.parquet", use_dictionary=False)
    return sum(p.stat().st_size for p in shards.glob("*.parquet"))


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    import ray

    from gram_ray.config import load_config
    from gram_ray.data.parquet_layout import read_cache
    from gram_ray.data.text import build_word_vocab
    from gram_ray.demo import DEMO_CONFIG
    from gram_ray.train.datasets import TrainingData, _maybe_materialize
    from gram_ray.train.layout import RunLayout
    from gram_ray.train.trainer import build_trainer, train_env

    cfg = load_config(
        DEMO_CONFIG,
        [
            "train.epochs=2",
            "train.eval_every_epochs=1",
            "train.warmup_steps=10",
            "train.log_every_steps=13",
            f"data.video.train_draws={DRAWS}",
            "train.shuffle_buffer=64",
            "train.keep_checkpoints=2",
            "scaling.num_workers=2",
            "data.materialize=never",  # stream from the files every epoch
            "data.video.cache_codec=raw",  # what write_cache writes
            "wandb.enabled=false",
        ],
    )
    shards = work / "cache" / "train" / "shards"
    cache_bytes = write_cache(shards, cfg)
    ray.init(address="local", num_cpus=8, object_store_memory=OBJECT_STORE, include_dashboard=False,
             log_to_driver=False, configure_logging=False)  # fmt: skip
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            stats = get_memory_info_reply(state).store_stats
            samples.append((stats.object_store_bytes_used, stats.spilled_bytes_total))
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    vocab = build_word_vocab(WORDS)
    train, kept = _maybe_materialize(read_cache(str(shards)), str(shards), cfg, print)  # as prepare_data decides
    data = TrainingData(train, None, ROWS, vocab, None if kept else str(shards))
    layout = RunLayout.of(cfg, work / "run")
    started = time.perf_counter()
    with train_env(cfg):
        result = build_trainer(cfg, data, layout).fit()
    stop.set()
    thread.join()
    reports = [metrics for _, metrics in result.best_checkpoints]  # one checkpoint at each epoch's end
    epochs = sorted(
        ({k: v for k, v in m.items() if k.startswith("train/") or k in ("epoch", "step")} for m in reports),
        key=lambda m: m["step"],
    )
    out.write_text(
        json.dumps(
            {
                "error": repr(result.error) if result.error else None,
                "rows": ROWS,
                "cache_bytes": cache_bytes,
                "object_store_bytes": OBJECT_STORE,
                "object_store_peak_bytes": max(used for used, _ in samples),
                "spilled_bytes": max(spilled for _, spilled in samples),
                "samples": len(samples),
                "epochs": epochs,
                "fit_seconds": time.perf_counter() - started,
            },
            indent=2,
        )
    )
    ray.shutdown()


if __name__ == "__main__":
    main()

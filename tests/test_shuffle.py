"""The train split's order every epoch, through the same Ray Data pieces the trainer uses: the shuffled dataset,
Ray Train's equal streaming split over two workers, and each worker's iter_torch_batches options."""

import threading

import numpy as np
import pytest
from tiny import tiny_config

from gram_ray.data.epoch_progress import FILE, EpochProgress
from gram_ray.data.schema import object_column
from gram_ray.train.datasets import keep_in_memory, shuffled, shuffled_rest, train_iter_options

ROWS, WORKERS = 64, 2


@pytest.fixture(scope="module")
def cached_rows(ray_session):
    import ray.data

    cfg = tiny_config()
    rng = np.random.default_rng(0)
    ids = [f"clip{i:03d}" for i in range(ROWS)]
    batch = {
        "id": np.array(ids, dtype=object),
        "captions": object_column([[f"caption {i}"] for i in range(ROWS)]),
        "frames": rng.integers(0, 255, (ROWS, 2, 3, 16, 16), dtype=np.uint8),
        "audio_fbank": rng.standard_normal((ROWS, 1, 64, 64)).astype(np.float32),
        "has_audio": np.ones(ROWS, dtype=bool),
        FILE: np.array([_file(i) for i in range(ROWS)], dtype=object),  # as read_cache(with_files=True) gives
    }
    ds = keep_in_memory(ray.data.from_items([{k: v[i] for k, v in batch.items()} for i in range(ROWS)]), cfg)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "caption"] + [str(i) for i in range(ROWS)]
    return cfg, ds, vocab, ids


def _file(row: int) -> str:
    return f"shard-{row // 8:05d}.parquet"  # 8 files of 8 clips


def _epochs(ds, cfg, vocab, epochs):
    """ids each worker trains on, per epoch: {epoch: [rank 0's list, rank 1's list]}."""
    shards = ds.streaming_split(WORKERS, equal=True)
    seen = {e: [[] for _ in range(WORKERS)] for e in range(epochs)}

    def worker(rank):
        for epoch in range(epochs):
            for batch in shards[rank].iter_torch_batches(**train_iter_options(cfg, vocab, epoch, rank)):
                seen[epoch][rank].extend(batch["ids"])

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return seen


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_a_new_order_every_epoch_and_every_clip_once(cached_rows, mode):
    cfg, ds, vocab, ids = cached_rows
    cfg = cfg.model_copy(deep=True)
    cfg.train.shuffle = mode
    seen = _epochs(shuffled(ds, cfg, start_epoch=0), cfg, vocab, epochs=2)
    for epoch in (0, 1):
        every = seen[epoch][0] + seen[epoch][1]
        assert len(every) == len(set(every)) == ROWS, epoch  # 64 rows / (2 x 4) per step: drop_last drops none
    assert seen[0] != seen[1]  # each worker's order differs between epochs
    assert seen[0][0] + seen[0][1] != ids  # and is not the file order


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_the_rest_of_an_epoch_leaves_out_exactly_the_consumed_clips(cached_rows, mode):
    cfg, ds, vocab, ids = cached_rows
    cfg = cfg.model_copy(deep=True)
    cfg.train.shuffle = mode
    # 16 clips, two global steps' worth: a file trained on whole (recorded by its name) and 8 clips of 4 others
    # (by id), as a mid-epoch checkpoint records them.
    consumed = [i for n, i in enumerate(ids) if _file(n) == _file(16) or n in (0, 1, 8, 9, 32, 33, 40, 41)]
    progress = EpochProgress({_file(n): 8 for n in range(0, ROWS, 8)})
    progress.add([_file(ids.index(i)) for i in consumed], consumed)
    assert progress.done == {_file(16)} and len(progress.ids()) == 8
    seen = _epochs(shuffled_rest(ds, cfg, 1, progress), cfg, vocab, epochs=1)
    rest = seen[0][0] + seen[0][1]
    assert sorted(rest) == sorted(set(ids) - set(consumed))

"""The train split's order every epoch, through the same Ray Data pieces the trainer uses: the shuffled dataset,
Ray Train's equal streaming split over two workers, and each worker's iter_torch_batches options."""

import threading

import numpy as np
import pytest
from tiny import tiny_config

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
    }
    ds = keep_in_memory(ray.data.from_items([{k: v[i] for k, v in batch.items()} for i in range(ROWS)]), cfg)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "caption"] + [str(i) for i in range(ROWS)]
    return cfg, ds, vocab, ids


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
    consumed = ids[::4]  # 16 clips: two global steps' worth
    seen = _epochs(shuffled_rest(ds, cfg, 1, consumed), cfg, vocab, epochs=1)
    rest = seen[0][0] + seen[0][1]
    assert sorted(rest) == sorted(set(ids) - set(consumed))

"""A checkpoint barely pauses training (train/checkpointing.py), without Ray: the loop copies the state to host
memory and a report that stores it in the background (as Ray Train's upload thread does for worker.py) lets
training go on. What is stored is the state of its step; at most one checkpoint is in flight; a failure in the
background stops the run with the step and what is kept. Through Ray Train: tests/test_trainer_ray.py and the
storage-fault runs."""

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tiny import in_memory, random_rows, saved, tiny_config

from gram_ray.data.text import build_word_vocab
from gram_ray.model.checkpoint import CheckpointWriteError, load_checkpoint
from gram_ray.train.checkpointing import TakenCheckpoint, host_copy
from gram_ray.train.loop import run_training

ROWS = 16  # 4 steps an epoch at the tiny config's batch of 4


def _setup(*extra: str):
    cfg = tiny_config("train.epochs=2", "train.checkpoint_every_steps=1", "train.log_every_steps=1", *extra)
    rows = random_rows(cfg, ROWS)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    return cfg, rows, vocab


class SlowStorage:
    """A report that stores each checkpoint on one background thread (Ray Train's: one upload thread), each upload
    taking `upload_s`, into `folder`/step-N; it records the steps trained while each was in flight."""

    def __init__(self, folder, upload_s: float = 0.3, fail_at: int | None = None) -> None:
        self.folder, self.upload_s, self.fail_at = folder, upload_s, fail_at
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.in_flight, self.most_in_flight, self.lock = 0, 0, threading.Lock()
        self.logged: list[int] = []  # steps logged, in order
        self.stored: list[tuple[int, list[int]]] = []  # (checkpoint step, steps logged while it was uploading)
        self.local_folders: list = []  # where each checkpoint was written before its upload

    def upload(self, step: int, before: int, folder):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.upload_s)
            if step == self.fail_at:
                raise OSError(28, "No space left on device")
            shutil.copytree(folder, self.folder / f"step-{step}")
            self.stored.append((step, self.logged[before:]))
        finally:
            with self.lock:
                self.in_flight -= 1

    def report(self, metrics: dict, checkpoint: TakenCheckpoint | None):
        if checkpoint is None:
            return False
        self.local_folders.append(checkpoint.folder)
        logged = len(self.logged)  # the steps logged after this one were trained while it was stored
        self.pool.submit(checkpoint.store, lambda folder: self.upload(checkpoint.step, logged, folder))
        return True

    def log(self, metrics: dict) -> None:
        self.logged.append(metrics["step"])


def _train(cfg, rows, vocab, report, log=lambda m: None):
    return run_training(cfg, **in_memory(cfg, rows, vocab), report=report, log=log)


def test_training_goes_on_while_a_checkpoint_is_stored_and_what_is_stored_is_its_steps_state(tmp_path):
    cfg, rows, vocab = _setup()
    before = []  # today's synchronous checkpoints (train.checkpoint_in_background=false), the reference
    sync_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_in_background": False})})
    _train(sync_cfg, rows, vocab, lambda m, c: before.append(saved(c)) if c is not None else None)

    storage = SlowStorage(tmp_path)
    _train(cfg, rows, vocab, storage.report, storage.log)
    assert [s for s, _ in storage.stored] == list(range(1, 9))  # every checkpoint, in order, the last before return
    assert any(trained for _, trained in storage.stored)  # steps were trained while an upload was in flight
    assert storage.most_in_flight == 1
    for reference in before:  # stored from the host copy: the step's weights, not a later step's
        stored = load_checkpoint(tmp_path / f"step-{reference['step']}")
        assert stored["step"] == reference["step"]
        for name, tensor in reference["model"].items():
            assert torch.equal(stored["model"][name], tensor), (reference["step"], name)
        moments = [v for s in reference["optimizer"]["state"].values() for v in s.values()]
        stored_moments = [v for s in stored["optimizer"]["state"].values() for v in s.values()]
        assert all(torch.equal(a, b) for a, b in zip(moments, stored_moments, strict=True))
    assert not any(folder.exists() for folder in storage.local_folders)  # removed once uploaded


def test_a_checkpoint_waits_for_the_one_in_flight_so_host_memory_holds_one_copy(tmp_path):
    cfg, rows, vocab = _setup()
    storage = SlowStorage(tmp_path, upload_s=1.0)  # slower than a step: every checkpoint finds one in flight
    started = time.perf_counter()
    _train(cfg, rows, vocab, storage.report, storage.log)
    assert storage.most_in_flight == 1 and len(storage.stored) == 8
    assert time.perf_counter() - started >= 8 * 1.0  # each waited for the last: none queued behind another


def test_a_failure_in_the_background_stops_the_run_with_its_step_and_the_last_checkpoint_kept(tmp_path):
    cfg, rows, vocab = _setup()
    storage = SlowStorage(tmp_path, fail_at=3)
    with pytest.raises(CheckpointWriteError, match=r"step 3: .*No space left.*untouched \(the last at step 2\)"):
        _train(cfg, rows, vocab, storage.report, storage.log)
    assert [s for s, _ in storage.stored] == [1, 2]
    assert load_checkpoint(tmp_path / "step-2")["step"] == 2  # intact and loadable
    assert max(storage.logged) <= 5  # raised at the next checkpoint after the failure, not at the run's end


def test_the_host_copy_shares_no_memory_with_the_live_state():
    live = {"w": torch.ones(3), "opt": {"state": {0: {"exp_avg": torch.zeros(2)}}, "groups": [{"lr": 0.1}]}}
    copy = host_copy(live)
    live["w"].add_(1)
    live["opt"]["state"][0]["exp_avg"].add_(1)
    live["opt"]["groups"][0]["lr"] = 0.2
    assert torch.equal(copy["w"], torch.ones(3)) and torch.equal(copy["opt"]["state"][0]["exp_avg"], torch.zeros(2))
    assert copy["opt"]["groups"][0]["lr"] == 0.1


def test_a_checkpoint_folder_left_by_a_killed_worker_is_removed_and_a_live_ones_is_kept(tmp_path):
    import subprocess
    import sys

    from gram_ray.train.checkpointing import FOLDER_PREFIX, remove_orphans

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{FOLDER_PREFIX}{gone.stdout.strip()}-7-abcd1234"
    live = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-8-abcd1234"
    unrelated = tmp_path / "gram-ray-checkpoint-notes"
    for folder in (orphan, live, unrelated):
        folder.mkdir()
        (folder / "state.pt.partial").write_bytes(b"PK")
    assert remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and unrelated.exists()

"""The jobs other than training, from and to a bucket behind the fault layer (tests/storage_faults.py), each
run twice as a user runs it (its own process, its own Ray): once with no faults, once with transient faults of
every kind on every request (2% each, seeded; fewer in a row than the 4 attempts allow). What they write and
answer must not differ: the same cache rows, the same evaluation, the same index, the same search results, the
same sweep.

In `make test-cluster` (marker `long`: about 10 minutes); training's plans are in test_storage_fault_runs.py.
"""

import csv
import functools
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from storage_faults import KINDS, Fault, FaultyS3

from gram_ray import storage

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.long]

ENV = {
    "AWS_MAX_ATTEMPTS": "4",
    "GRAM_RAY_STORAGE_REQUEST_TIMEOUT_S": "3",
    "GRAM_RAY_STORAGE_CONNECT_TIMEOUT_S": "3",
    "GRAM_RAY_STORAGE_OUTAGE_S": "60",
    "WANDB_MODE": "disabled",
}


def _run(proxy: FaultyS3, args: tuple[str, ...], **env: str) -> subprocess.CompletedProcess:
    """One gram-ray command as a user runs it (its own process and Ray), its storage behind the fault layer."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | ENV | {"AWS_ENDPOINT_URL": proxy.endpoint} | env
    return subprocess.run(
        [sys.executable, "-m", "gram_ray", *args], env=env, capture_output=True, text=True, timeout=900
    )


def _gram_ray(proxy: FaultyS3, timings: dict, *args: str) -> str:
    """Run one gram-ray command against the fault layer; note its time, requests and the faults it met."""
    before, started = len(proxy.entries()), time.monotonic()
    run = _run(proxy, args)
    assert run.returncode == 0, f"gram-ray {args[0]}: " + (run.stdout + run.stderr)[-3000:]
    met = proxy.entries()[before:]
    timings[args[0]] = {
        "s": round(time.monotonic() - started, 1),
        "requests": len(met),
        "faults": dict(Counter(e.outcome for e in met if e.outcome in KINDS)),
    }
    return run.stdout


def _report(timings: dict) -> None:
    for job in timings["clean"]:
        clean, faulty = timings["clean"][job], timings["faulty"][job]
        print(
            f"{job}: {clean['s']:.0f} s, {clean['requests']} requests without faults; {faulty['s']:.0f} s, "
            f"{faulty['requests']} requests with {sum(faulty['faults'].values())} faults {faulty['faults']}"
        )


def _checkpoint(synth_small: dict, tmp_path: Path, bucket: str) -> tuple[str, Path]:
    """The tiny model with random weights (seeded) and a match head, as a checkpoint in the bucket, and its config
    file."""
    from tiny import tiny_config

    from gram_ray.config import save_config
    from gram_ray.data.manifest import read_annotations
    from gram_ray.data.text import build_word_vocab
    from gram_ray.model.checkpoint import save_checkpoint
    from gram_ray.model.gram import build_model

    cfg = tiny_config("model.text.cross_attention=true", "model.itm_ratio=0.1")  # a match head: search --rerank
    rows = read_annotations(synth_small["train"]) + read_annotations(synth_small["val"])
    vocab = build_word_vocab(c for r in rows for c in r.captions)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", build_model(cfg, vocab).state_dict(), cfg, vocab)
    storage.upload_dir(tmp_path / "ckpt", f"{bucket}/ckpt")
    save_config(cfg, tmp_path / "config.yaml")
    return f"{bucket}/ckpt", tmp_path / "config.yaml"


def _cache_rows(cache: str) -> list[dict]:
    return sorted(storage.read_table(storage.join(cache, "shards")).to_pylist(), key=lambda r: r["id"])


def test_preprocess_evaluate_index_and_search_through_transient_faults_equal_the_runs_without(
    faulty_bucket, synth_small, tmp_path
):
    from gram_ray.retrieval.index import load_index

    data, bucket, proxy = faulty_bucket
    checkpoint, config = _checkpoint(synth_small, tmp_path, bucket)
    answers, timings = {}, {"clean": {}, "faulty": {}}
    for name in ("clean", "faulty"):
        if name == "faulty":  # every request of every job, media reads included
            proxy.add(*[Fault(kind, rate=0.02, stall_s=5) for kind in KINDS])
        root, out = f"{bucket}/{name}", tmp_path / name
        out.mkdir()
        job = functools.partial(_gram_ray, proxy, timings[name])
        media = ["--video-dir", data["videos"], "--audio-dir", data["audios"]]
        job("preprocess", "--config", str(config), "--annotations", data["val"], *media, "--out", f"{root}/cache",
            "--mode", "eval")  # fmt: skip
        job("evaluate", "--checkpoint", checkpoint, "--data", f"{root}/cache", "--json", str(out / "eval.json"))
        job("index", "--checkpoint", checkpoint, "--data", f"{root}/cache", "--out", f"{root}/index")
        job("search", "--index", f"{root}/index", "a red square", "--rerank", "--json", str(out / "search.json"))
        answers[name] = {
            "cache": _cache_rows(f"{root}/cache"),
            "eval": json.loads((out / "eval.json").read_text()),
            "index": load_index(f"{root}/index"),
            "search": json.loads((out / "search.json").read_text()),
        }
    injected = proxy.injected()
    print()
    _report(timings)
    assert set(injected) == set(KINDS), injected  # every kind of fault met the jobs

    clean, faulty = answers["clean"], answers["faulty"]
    assert len(clean["cache"]) == len(faulty["cache"]) == 8
    assert faulty["cache"] == clean["cache"]  # every column of every row, JPEG bytes and filterbanks included
    assert faulty["eval"] == clean["eval"]
    a, b = clean["index"], faulty["index"]
    assert a.ids == b.ids and a.captions == b.captions
    for modality in a.clips.embeddings:
        assert torch.equal(a.clips.embeddings[modality], b.clips.embeddings[modality]), modality
    assert torch.equal(a.caption_embeddings, b.caption_embeddings)

    def hits(answer):
        return [[(h["rank"], h["id"], h["score"]) for h in result["hits"]] for result in answer]

    assert hits(faulty["search"]) == hits(clean["search"]) and hits(clean["search"])[0]


def _trial_checkpoints(root: str) -> dict[tuple[float, int], dict]:
    """{(trial's learning rate, step): model weights} of every checkpoint a sweep stored under root."""
    import pyarrow.fs as pafs

    from gram_ray.model.checkpoint import checkpoint_config, load_checkpoint
    from gram_ray.train.resume import checkpoint_is_whole, position

    fs, path = storage.resolve(storage.join(root, "trials"))
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.base_name != "state.pt":
            continue
        folder = "s3://" + info.path.rsplit("/", 1)[0]
        assert checkpoint_is_whole(folder), folder
        lr = checkpoint_config(folder).train.lr
        found[(lr, position(folder)["step"])] = load_checkpoint(folder)["model"]
    return found


def test_a_two_trial_sweep_through_transient_faults_equals_the_sweep_without(faulty_bucket, tmp_path):
    from tiny import REPEATABLE_RUN, synth_data, tiny_config

    from gram_ray.config import save_config
    from gram_ray.tune import sweep_root

    data, bucket, proxy = faulty_bucket
    timings, trials, checkpoints = {"clean": {}, "faulty": {}}, {}, {}
    for name in ("clean", "faulty"):
        if name == "faulty":
            proxy.add(*[Fault(kind, rate=0.02, stall_s=5) for kind in KINDS])
        cfg = tiny_config(
            *synth_data(data),
            f"run.storage_path={bucket}/{name}",
            *REPEATABLE_RUN,  # the trials repeat exactly, checkpoint for checkpoint
            "tune.num_samples=1",
            "tune.max_concurrent_trials=2",
            "tune.grace_period=2",  # = every evaluation: ASHA stops neither trial
            "tune.metric=train/loss",
            "tune.mode=min",
            "tune.search_space={train.lr: {grid: [1.0e-2, 1.0e-3]}}",
        )
        save_config(cfg, tmp_path / f"{name}.yaml")
        _gram_ray(proxy, timings[name], "tune", "--config", str(tmp_path / f"{name}.yaml"), "--out",
                  str(tmp_path / name))  # fmt: skip
        with (tmp_path / name / "trials.csv").open() as f:
            trials[name] = sorted(({k: v for k, v in row.items() if k != "trial_id"} for row in csv.DictReader(f)),
                                  key=lambda row: row["train.lr"])  # fmt: skip
        checkpoints[name] = _trial_checkpoints(sweep_root(cfg))
    print()
    _report(timings)
    assert sum(timings["faulty"]["tune"]["faults"].values()) >= 5, timings

    assert [row["status"] for row in trials["clean"]] == ["completed", "completed"], trials
    assert trials["faulty"] == trials["clean"]  # the same best train/loss, evaluations and status, trial by trial
    clean, faulty = checkpoints["clean"], checkpoints["faulty"]
    assert len(clean) == 8 and sorted(faulty) == sorted(clean), (sorted(clean), sorted(faulty))
    for key, weights in clean.items():
        for tensor_name, tensor in weights.items():
            assert torch.equal(faulty[key][tensor_name], tensor), (key, tensor_name)


def _fails(proxy: FaultyS3, *args: str) -> tuple[str, float]:
    """Run a gram-ray command that must fail with one line; that line and when it ended."""
    # Storage gone for good: the bound under test is outage_s's.
    run = _run(proxy, args, GRAM_RAY_STORAGE_OUTAGE_S="10")
    ended = time.monotonic()
    output = run.stdout + run.stderr
    last = output.strip().splitlines()[-1]
    assert run.returncode != 0 and last.startswith("Error: "), output[-6000:]  # one line, not a traceback
    return last, ended


def test_storage_gone_during_preprocess_keeps_the_finished_shards_and_the_rerun_finishes_the_rest(
    faulty_bucket, synth_small, tmp_path
):
    data, bucket, proxy = faulty_bucket
    _, config = _checkpoint(synth_small, tmp_path, bucket)
    media = ["--video-dir", data["videos"], "--audio-dir", data["audios"]]
    timings: dict = {}
    _gram_ray(proxy, timings, "preprocess", "--config", str(config), "--annotations", data["val"], *media,
              "--out", f"{bucket}/clean/cache", "--mode", "eval")  # fmt: skip
    outage = {}

    def go_away():  # a shard is written and recorded: from now on nothing under the cache is answered
        outage["fault"] = proxy.outage("503", key=r"/gone/cache/")
        outage["at"] = time.monotonic()

    proxy.when_stored(r"/gone/cache/_done/shard-\d+\.json", go_away)
    last, ended = _fails(proxy, "preprocess", "--config", str(config), "--annotations", data["val"], *media,
                         "--out", f"{bucket}/gone/cache", "--mode", "eval")  # fmt: skip
    print(f"\nstorage gone during preprocess: it ended {ended - outage['at']:.0f} s later: {last}")
    assert "storage failed" in last, last
    assert re.search(rf"{bucket}/gone/cache/\S+", last), last  # names the object
    assert "a rerun continues from them" in last
    assert ended - outage["at"] < 10 + 30 + 30, ended - outage["at"]

    proxy.heal()
    output = _gram_ray(proxy, timings, "preprocess", "--config", str(config), "--annotations", data["val"],
                       *media, "--out", f"{bucket}/gone/cache", "--mode", "eval")  # fmt: skip
    kept = re.search(r"resuming: (\d+) of (\d+) shards", output)
    progress = "\n".join(f"{e.t} {e.method} {e.target} {e.outcome}" for e in proxy.entries(key=r"/gone/cache/_done/"))
    assert kept and 1 <= int(kept[1]) < int(kept[2]), f"{output[-3000:]}\nthe _done requests:\n{progress}"
    print(f"the rerun: {kept[0]}")
    assert _cache_rows(f"{bucket}/gone/cache") == _cache_rows(f"{bucket}/clean/cache")


def test_storage_gone_during_an_index_build_keeps_the_finished_shards_and_the_rerun_finishes_it(
    faulty_bucket, synth_small, tmp_path
):
    from gram_ray.retrieval.index import SearchIndexError, load_index

    data, bucket, proxy = faulty_bucket
    checkpoint, config = _checkpoint(synth_small, tmp_path, bucket)
    timings: dict = {}
    media = ["--video-dir", data["videos"], "--audio-dir", data["audios"]]
    _gram_ray(proxy, timings, "preprocess", "--config", str(config), "--annotations", data["val"], *media,
              "--out", f"{bucket}/cache", "--mode", "eval")  # fmt: skip
    _gram_ray(proxy, timings, "index", "--checkpoint", checkpoint, "--data", f"{bucket}/cache", "--out",
              f"{bucket}/clean")  # fmt: skip
    outage = {}

    def go_away():  # an index shard is written and recorded: from now on the index's folder is gone
        outage["fault"] = proxy.outage("503", key=r"/gone/")
        outage["at"] = time.monotonic()

    proxy.when_stored(r"/gone/_done/[^/?]+\.json", go_away)
    last, ended = _fails(proxy, "index", "--checkpoint", checkpoint, "--data", f"{bucket}/cache", "--out",
                         f"{bucket}/gone")  # fmt: skip
    print(f"\nstorage gone during an index build: it ended {ended - outage['at']:.0f} s later: {last}")
    assert "storage failed" in last, last
    assert re.search(rf"{bucket}/gone/\S+", last), last
    assert ended - outage["at"] < 10 + 30 + 30, ended - outage["at"]
    proxy.heal()
    with pytest.raises(SearchIndexError, match="not complete"):
        load_index(f"{bucket}/gone")
    output = _gram_ray(proxy, timings, "index", "--checkpoint", checkpoint, "--data", f"{bucket}/cache",
                       "--out", f"{bucket}/gone")  # fmt: skip
    kept = re.search(r"resuming: (\d+) of (\d+) cache files are indexed already", output)
    assert kept and 1 <= int(kept[1]) < int(kept[2]), output[-3000:]
    print(f"the rerun: {kept[0]}")
    a, b = load_index(f"{bucket}/clean"), load_index(f"{bucket}/gone")
    assert a.ids == b.ids and torch.equal(a.caption_embeddings, b.caption_embeddings)
    for modality in a.clips.embeddings:
        assert torch.equal(a.clips.embeddings[modality], b.clips.embeddings[modality]), modality

import json

import numpy as np
import pytest
import torch
from tiny import batches, load_split, tiny_config

from gram_ray.config import EncoderConfig, load_config, save_config
from gram_ray.data.text import build_word_vocab, make_tokenizer
from gram_ray.evaluate import evaluate_embeddings, load_embedding_dir, retrieval_metrics
from gram_ray.model.encoders import load_backbone
from gram_ray.tracking import Tracker
from gram_ray.train.loop import build_model, load_checkpoint, main_metric_name, make_collate, run_training


@pytest.fixture(scope="module")
def setup(synth_small):
    cfg = tiny_config()
    train, val = load_split(synth_small, "train", cfg), load_split(synth_small, "val", cfg)
    vocab = build_word_vocab(c for caps in train["captions"] for c in caps)
    return cfg, train, val, vocab, make_tokenizer(None, vocab)


def test_model_forward_backward(setup):
    cfg, train, _, vocab, tok = setup
    model = build_model(cfg, vocab)
    batch = make_collate(tok, cfg, train=True)({k: v[:4] for k, v in train.items()})
    out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits_t2v.shape == (4, 4)
    emb = model.embed(batch)
    assert set(emb) == {"text", "video", "audio"}
    assert all(torch.allclose(e.norm(dim=-1), torch.ones(4)) for e in emb.values())
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_pretrained_encoders_load_from_disk_by_path(setup, tmp_path):
    cfg = setup[0]
    for tower, enc in (("text", cfg.model.text), ("vision", cfg.model.vision), ("audio", cfg.model.audio)):
        random = load_backbone(enc, tower)
        random.save_pretrained(tmp_path / tower)
        loaded = load_backbone(EncoderConfig(pretrained=str(tmp_path / tower)), tower)
        for (name, a), b in zip(random.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), name

    # The GRAM model built on those paths: pretrained encoders train at encoder_lr, the rest at lr.
    text_cfg = cfg.model.text.model_copy(update={"pretrained": str(tmp_path / "text"), "config": {}})
    cfg2 = cfg.model_copy(deep=True)
    cfg2.model.text = text_cfg
    cfg2.model.tokenizer = None
    model = build_model(cfg2, vocab=None)
    assert len(model.pretrained_parameters()) == len(list(model.text.parameters()))


def _run(cfg, train, val, vocab, tok, resume=None, reports=None, epochs_batches=None):
    reports = [] if reports is None else reports

    def report(metrics, ckpt):
        saved = load_checkpoint(ckpt) if ckpt else None
        reports.append((metrics, saved))

    last = run_training(
        cfg,
        train_batches=lambda epoch: batches(train, cfg.train.batch_size, make_collate(tok, cfg, True, epoch)),
        val_batches=lambda: batches(val, cfg.train.eval_batch_size, make_collate(tok, cfg, False), drop_last=False),
        steps_per_epoch=len(train["id"]) // cfg.train.batch_size,
        report=report,
        vocab=vocab,
        resume=resume,
    )
    return last, reports


def test_loop_runs_directly_and_reports_checkpoints(setup):
    cfg, train, val, vocab, tok = setup
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs = 2
    last, reports = _run(cfg, train, val, vocab, tok)
    steps = len(train["id"]) // cfg.train.batch_size
    assert [m["step"] for m, _ in reports] == [steps, 2 * steps]
    metrics, saved = reports[-1]
    assert main_metric_name(cfg) in metrics and 0 <= metrics[main_metric_name(cfg)] <= 100
    assert json.loads(metrics["val_eval"])["volume"]["text-video-audio"]["t2v"]["R@1"] == metrics[main_metric_name(cfg)]
    assert saved["step"] == 2 * steps and saved["epoch"] == 1 and saved["vocab"] == vocab
    assert np.isfinite(metrics["train/loss"]) and metrics["train/samples_per_s"] > 0


def test_resume_continues_step_count_and_optimizer_state(setup):
    cfg, train, val, vocab, tok = setup
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs = 1
    _, first = _run(cfg, train, val, vocab, tok)
    checkpoint = first[-1][1]
    cfg.train.epochs = 2
    _, resumed = _run(cfg, train, val, vocab, tok, resume=checkpoint)
    steps = len(train["id"]) // cfg.train.batch_size
    assert [m["step"] for m, _ in resumed] == [2 * steps]  # only epoch 1 ran, counting on from the checkpoint
    state = resumed[-1][1]
    exp_avg_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert exp_avg_steps == {2 * steps}  # AdamW moments carried over, not restarted
    assert state["scheduler"]["last_epoch"] == 2 * steps


def test_retrieval_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.normal(size=(9, 5)))
    t2v_map = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4])
    got = retrieval_metrics(scores, t2v_map, higher_is_better=True)
    s = scores.numpy()
    t2v = [1 + sum(s[i, j] > s[i, t2v_map[i]] for j in range(5)) for i in range(9)]
    v2t = [min(1 + sum(s[k, v] > s[i, v] for k in range(9)) for i in range(9) if t2v_map[i] == v) for v in range(5)]
    assert got["t2v"]["R@1"] == pytest.approx(100 * np.mean(np.array(t2v) <= 1))
    assert got["t2v"]["MeanR"] == pytest.approx(np.mean(t2v)) and got["t2v"]["MedR"] == np.median(t2v)
    assert got["v2t"]["R@5"] == pytest.approx(100 * np.mean(np.array(v2t) <= 5))
    assert got["v2t"]["MeanR"] == pytest.approx(np.mean(v2t))
    lower = retrieval_metrics(-scores, t2v_map, higher_is_better=False)
    assert lower == got


def test_evaluate_embeddings_on_real_gram_embeddings(shared_data):
    emb, mapping = load_embedding_dir(shared_data / "gram-msrvtt-embeddings")
    metrics = evaluate_embeddings(emb, mapping)
    assert set(metrics) == {"volume", "cosine"}
    assert "text-video-audio-subtitles" in metrics["volume"] and "text-video" in metrics["cosine"]
    tva = metrics["volume"]["text-video-audio"]["t2v"]
    assert 20 < tva["R@1"] <= tva["R@5"] <= tva["R@10"] <= 100 and tva["MedR"] >= 1
    # For unit vectors a k=2 volume is sin(angle): the same ranking as cosine among candidates within 90 degrees,
    # so the top of the ranking agrees (far candidates with negative cosine only move MeanR).
    for direction in ("t2v", "v2t"):
        vol, cos = metrics["volume"]["text-video"][direction], metrics["cosine"]["text-video"][direction]
        assert (vol["R@1"], vol["R@5"], vol["MedR"]) == (cos["R@1"], cos["R@5"], cos["MedR"])


def test_offline_wandb_run_written_and_read_back(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    cfg = load_config(None, ["wandb.mode=auto", "run.name=offline-test"])
    tracker = Tracker(cfg, tmp_path / "run")
    tracker.log({"step": 1, "train/loss": 2.5})
    tracker.log({"step": 2, "train/loss": 2.0})
    tracker.finish()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    # The offline run file is a log of protobuf records; history items keep their keys and JSON values as bytes.
    record_log = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"train/loss" in record_log and b"2.5" in record_log and b"offline-test" in record_log
    assert b"api_key" not in record_log.lower() and b"WANDB_API_KEY" not in record_log
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["train/loss"] for x in lines] == [2.5, 2.0]


def test_best_config_round_trip(tmp_path):
    cfg = tiny_config("train.lr=3e-4")
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import batches, load_split, saved, tiny_config, trained_ids
from wandb_records import history, read_records

from gram_ray.config import EncoderConfig, TrainConfig, load_config, save_config
from gram_ray.data.collate import Collate, epoch_batches
from gram_ray.data.schema import MODALITIES
from gram_ray.data.text import build_word_vocab
from gram_ray.model.encoders import load_backbone
from gram_ray.model.gram import build_model
from gram_ray.retrieval.metrics import evaluate_embeddings, load_embedding_dir, retrieval_metrics
from gram_ray.tracking import Tracker
from gram_ray.train.loop import main_metric_name, run_training


@pytest.fixture(scope="module")
def setup(synth_small):
    cfg = tiny_config()
    train, val = load_split(synth_small, "train", cfg), load_split(synth_small, "val", cfg)
    vocab = build_word_vocab(c for caps in train["captions"] for c in caps)
    return cfg, train, val, vocab


def test_model_forward_backward(setup):
    cfg, train, _, vocab = setup
    model = build_model(cfg, vocab)
    batch = Collate(cfg, vocab, train=True)({k: v[:4] for k, v in train.items()})
    out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits_t2v.shape == (4, 4)
    emb = model.embed(batch)
    assert set(emb) == {"text", "video", "audio"}
    assert all(torch.allclose(e.norm(dim=-1), torch.ones(4)) for e in emb.values())
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_data_contract_table_drives_collate_and_model(setup):
    cfg, train, _, vocab = setup
    model = build_model(cfg, vocab)
    batch = Collate(cfg, vocab, train=True)({k: v[:4] for k, v in train.items()})
    for name in cfg.model.modalities:
        spec = MODALITIES[name]
        assert spec.cache_column in train, name
        assert set(spec.batch_keys) <= set(batch), name
        assert isinstance(getattr(model, spec.encoder), torch.nn.Module), name


def test_pretrained_encoders_load_from_disk_by_path(setup, tmp_path):
    cfg = setup[0]
    for tower, enc in (("text", cfg.model.text), ("vision", cfg.model.vision), ("audio", cfg.model.audio)):
        random = load_backbone(enc, tower)
        random.save_pretrained(tmp_path / tower)
        loaded = load_backbone(
            EncoderConfig(pretrained=str(tmp_path / tower), cross_attention=enc.cross_attention), tower
        )
        for (name, a), b in zip(random.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), name

    # The GRAM model built on those paths: pretrained encoders train at encoder_lr, the rest at lr.
    text_cfg = cfg.model.text.model_copy(update={"pretrained": str(tmp_path / "text"), "config": {}})
    cfg2 = cfg.model_copy(deep=True)
    cfg2.model.text = text_cfg
    cfg2.model.tokenizer = None
    model = build_model(cfg2, vocab=None)
    assert len(model.pretrained_parameters()) == len(list(model.text.parameters()))


def _run(cfg, train, val, vocab, resume=None, reports=None):
    reports = [] if reports is None else reports

    def report(metrics, ckpt):
        reports.append((metrics, saved(ckpt) if ckpt else None))

    collate = Collate(cfg, vocab, train=True)
    last = run_training(
        cfg,
        train_batches=lambda epoch, skip: epoch_batches(train, cfg.train.batch_size, collate, epoch, skip),
        val_batches=(
            (lambda: batches(val, cfg.train.eval_batch_size, Collate(cfg, vocab, False), drop_last=False))
            if val is not None
            else None
        ),
        steps_per_epoch=len(train["id"]) // cfg.train.batch_size,
        report=report,
        vocab=vocab,
        resume=resume,
    )
    return last, reports


def test_loop_runs_directly_and_reports_checkpoints(setup):
    cfg, train, val, vocab = setup
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs = 2
    last, reports = _run(cfg, train, val, vocab)
    steps = len(train["id"]) // cfg.train.batch_size
    assert [m["step"] for m, _ in reports] == [steps, 2 * steps]
    metrics, saved = reports[-1]
    assert main_metric_name(cfg) in metrics and 0 <= metrics[main_metric_name(cfg)] <= 100
    assert json.loads(metrics["val_eval"])["volume"]["text-video-audio"]["t2v"]["R@1"] == metrics[main_metric_name(cfg)]
    assert saved["step"] == 2 * steps and saved["epoch"] == 1 and saved["vocab"] == vocab
    assert np.isfinite(metrics["train/loss"]) and metrics["train/samples_per_s"] > 0


def test_loop_times_each_phase_of_a_step_when_asked(setup):
    cfg, train, val, vocab = setup
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs, cfg.train.time_steps = 1, True
    last, reports = _run(cfg, train, None, vocab)
    steps = len(train["id"]) // cfg.train.batch_size
    assert last["time/timed_steps"] == steps - 2  # the first two steps are warm-up
    phases = [last[f"time/{p}_ms"] for p in ("data", "forward", "backward", "optimizer")]
    assert all(ms > 0 for ms in phases) and sum(phases) == pytest.approx(last["time/step_ms"], rel=1e-9)
    assert last["time/samples_per_s"] == pytest.approx(cfg.train.batch_size * 1000 / last["time/step_ms"], rel=1e-9)
    cfg.train.time_steps = False
    untimed, _ = _run(cfg, train, None, vocab)
    assert not any(k.startswith("time/") for k in untimed)


def test_resume_continues_step_count_and_optimizer_state(setup):
    cfg, train, val, vocab = setup
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs = 1
    _, first = _run(cfg, train, val, vocab)
    checkpoint = first[-1][1]
    cfg.train.epochs = 2
    _, resumed = _run(cfg, train, val, vocab, resume=checkpoint)
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
    assert len(runs) == 1
    (run_file,) = runs[0].glob("*.wandb")
    records = read_records(run_file)
    kinds = {r.WhichOneof("record_type") for r in records}
    assert {"run", "history", "exit"} <= kinds
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "offline-test"
    logged = [row for row in history(records) if "train/loss" in row]
    assert [(row["step"], row["train/loss"]) for row in logged] == [(1, 2.5), (2, 2.0)]
    raw = run_file.read_bytes()
    assert b"api_key" not in raw.lower() and b"WANDB_API_KEY" not in raw
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["train/loss"] for x in lines] == [2.5, 2.0]


def test_best_config_round_trip(tmp_path):
    cfg = tiny_config("train.lr=3e-4")
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


class _Interrupted(Exception):
    pass


def _resume_run(cfg, train, vocab, resume=None, stop_at=None):
    """run_training over in-memory rows; stop_at: raise right after the mid-epoch checkpoint of that step, as
    a killed run would. Returns (lr of every optimizer step, checkpoints reported, ids trained on per epoch,
    the epoch-end reports)."""
    lrs, checkpoints, seen, epoch_ends = [], [], {}, []
    collate = Collate(cfg, vocab, train=True)

    def train_batches(epoch, skip):
        for batch in epoch_batches(train, cfg.train.batch_size, collate, epoch, skip):
            seen.setdefault(epoch, []).extend(batch["ids"])
            yield batch

    def report(metrics, ckpt):
        if ckpt is not None:
            checkpoints.append(saved(ckpt))
            if checkpoints[-1]["epoch_complete"]:
                epoch_ends.append(metrics)
        if stop_at is not None and metrics["step"] == stop_at:
            raise _Interrupted

    try:
        run_training(
            cfg,
            train_batches=train_batches,
            val_batches=None,
            steps_per_epoch=len(train["id"]) // cfg.train.batch_size,
            report=report,
            vocab=vocab,
            resume=resume,
            log=lambda m: lrs.append((m["step"], m["train/lr"])),
        )
    except _Interrupted:
        pass
    return lrs, checkpoints, seen, epoch_ends


def test_resume_mid_epoch_equals_an_uninterrupted_run(setup):
    cfg, train, _, vocab = setup
    cfg = cfg.model_copy(deep=True)
    # 16 clips / batch 4 = 4 steps an epoch, 3 epochs; a checkpoint every 3 steps lands mid-epoch (step 3, 6).
    cfg.train.epochs, cfg.train.checkpoint_every_steps = 3, 3
    cfg.train.warmup_steps, cfg.train.schedule = None, "linear"  # warmup_ratio 0.1 of 12 steps
    assert cfg.model.text.config.get("hidden_dropout_prob", 0.1) > 0  # dropout on: the RNG state must carry over
    full_lrs, full_ckpts, full_seen, full_ends = _resume_run(cfg, train, vocab)
    first_lrs, first_ckpts, first_seen, _ = _resume_run(cfg, train, vocab, stop_at=6)
    mid = first_ckpts[-1]
    assert (mid["step"], mid["epoch"], mid["epoch_complete"]) == (6, 1, False)
    assert len(trained_ids(mid)) == 2 * cfg.train.batch_size  # steps 5 and 6 of epoch 1
    rest_lrs, rest_ckpts, rest_seen, rest_ends = _resume_run(cfg, train, vocab, resume=mid)

    # No batch replayed or skipped: the resumed epoch trains on exactly the clips the full run had left.
    assert first_seen[1] + rest_seen[1] == full_seen[1] and set(trained_ids(mid)) == set(first_seen[1])
    assert rest_seen[2] == full_seen[2] and full_seen[1] != full_seen[2]  # and a new order every epoch
    # The same step count, the same learning rate at every step, ending at 0 on the planned last step.
    assert [s for s, _ in first_lrs + rest_lrs] == [s for s, _ in full_lrs] == list(range(1, 13))
    np.testing.assert_allclose([lr for _, lr in first_lrs + rest_lrs], [lr for _, lr in full_lrs], rtol=1e-12)
    assert full_lrs[-1][1] == 0.0 and rest_ckpts[-1]["step"] == full_ckpts[-1]["step"] == 12
    # Every epoch's end reports that it trained each of the 16 clips once, the resumed epoch 1 included (8 before
    # the checkpoint, 8 after it), with the epoch's throughput and the largest peak RSS of a rank.
    counts = [
        [(m["epoch"], m["train/epoch_clips"], m["train/epoch_repeats"]) for m in ends]
        for ends in (full_ends, rest_ends)
    ]
    assert counts == [[(0, 16, 0), (1, 16, 0), (2, 16, 0)], [(1, 16, 0), (2, 16, 0)]]
    assert all(m["train/epoch_samples_per_s"] > 0 and m["train/peak_rss_mb"] > 100 for m in full_ends)
    # The same final weights, to rounding.
    final, expected = rest_ckpts[-1]["model"], full_ckpts[-1]["model"]
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_warmup_ratio_and_a_warmup_longer_than_the_run(setup):
    from gram_ray.train.loop import lr_factor, warmup_steps

    cfg = setup[0].model_copy(deep=True)
    cfg.train.warmup_steps, cfg.train.warmup_ratio = None, 0.1
    assert warmup_steps(cfg, 175) == 18  # msrvtt-sized: 10% of 175 steps, not 1,000
    assert [lr_factor(s, 2, 10, "linear") for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    cfg.train.warmup_steps = 1000
    with pytest.raises(ValueError, match="longer than the whole run"):
        warmup_steps(cfg, 175)
    msrvtt = load_config(Path(__file__).parents[1] / "configs" / "msrvtt.yaml")
    assert msrvtt.train.warmup_steps is None and msrvtt.train.warmup_ratio == 0.1


def test_optimizer_follows_grams_recipe(setup):
    from gram_ray.model.gram import build_model
    from gram_ray.train.loop import build_optimizer

    cfg, _, _, vocab = setup
    cfg = cfg.model_copy(deep=True)
    cfg.train.lr, cfg.train.encoder_lr, cfg.train.vision_lr = 1e-4, 2e-5, 5e-7
    defaults = TrainConfig()  # GRAM's AdamW (the demo config keeps its own tuning)
    assert (defaults.betas, defaults.eps, defaults.weight_decay) == ((0.9, 0.98), 1e-6, 0.01)
    cfg.train.betas, cfg.train.eps = defaults.betas, defaults.eps
    model = build_model(cfg, vocab)
    encoders = [p for enc in (model.text, model.vision, model.audio) for p in enc.parameters()]
    model.pretrained_parameters = lambda: encoders  # as if every encoder were loaded from pretrained weights
    optimizer, _ = build_optimizer(model, cfg, total_steps=10)
    lr_of = {id(p): (g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert {lr_of[id(p)][0] for p in model.vision.parameters()} == {5e-7}  # GRAM's clip_lr
    assert {lr_of[id(p)][0] for p in model.text.parameters()} | {lr_of[id(p)][0] for p in model.audio.parameters()} == {
        2e-5
    }
    assert {lr_of[id(p)][0] for p in model.projections.parameters()} == {1e-4}
    assert lr_of[id(model.loss_fn.log_temperature)] == (1e-4, 0.0)  # no decay on the temperature
    assert all(lr_of[id(p)][1] == 0.0 for n, p in model.named_parameters() if n.endswith("bias"))
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6


def test_evaluation_schedule_first_eval_and_evals_per_run(setup):
    cfg, train, val, vocab = setup
    cfg = cfg.model_copy(deep=True)
    steps = len(train["id"]) // cfg.train.batch_size
    cfg.train.epochs, cfg.train.evals_per_run, cfg.train.first_eval = 2, 3, True
    logged = []
    collate = Collate(cfg, vocab, train=True)
    run_training(
        cfg,
        train_batches=lambda epoch, skip: epoch_batches(train, cfg.train.batch_size, collate, epoch, skip),
        val_batches=lambda: batches(val, cfg.train.eval_batch_size, Collate(cfg, vocab, False), drop_last=False),
        steps_per_epoch=steps,
        report=lambda metrics, checkpoint: None,
        vocab=vocab,
        log=logged.append,
    )
    evaluated = [m["step"] for m in logged if main_metric_name(cfg) in m]
    total = 2 * steps
    assert evaluated == [0] + sorted({round(total * i / 3) for i in (1, 2, 3)})  # before training, then 3 spread


def test_global_batch_is_split_over_the_workers_or_refused():
    from tiny import tiny_config

    from gram_ray.config import ConfigError

    cfg = tiny_config("scaling.num_workers=4", "train.global_batch_size=32")
    assert cfg.worker_batch == 8 and cfg.step_clips == 32
    assert cfg.train.batch_size == tiny_config().train.batch_size  # the config as written: nothing set behind it
    with pytest.raises(ConfigError, match="does not divide over scaling.num_workers=4"):
        tiny_config("scaling.num_workers=4", "train.global_batch_size=30")


def test_a_fractional_epoch_count_stops_mid_epoch(setup):
    # GRAM trains VATEX for 2.5 epochs: the last epoch stops at round(epochs x steps an epoch), then evaluates.
    cfg, train, val, vocab = setup
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs = 1.5
    last, reports = _run(cfg, train, val, vocab)
    steps = len(train["id"]) // cfg.train.batch_size
    assert last["step"] == last["total_steps"] == round(1.5 * steps)
    assert [m["epoch"] for m, _ in reports] == [0, 1]


def test_crop_flip_augments_each_clip_in_training_only():
    from gram_ray.data.augment import crop_flip

    torch.manual_seed(0)
    frames = torch.arange(2 * 3 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 3, 16, 16)
    out = crop_flip(frames)
    assert out.shape == frames.shape and not torch.equal(out, frames)
    # one crop per clip: every frame of a clip moved the same way (their difference is the constant offset)
    offset = frames[:, 1] - frames[:, 0]
    torch.testing.assert_close(out[:, 1] - out[:, 0], offset)
    torch.manual_seed(1)
    flipped = sum(bool((crop_flip(frames)[:, 0, 0, 0, 0] > crop_flip(frames)[:, 0, 0, 0, -1]).any()) for _ in range(20))
    assert flipped > 0  # sometimes mirrored

"""GRAM's matching loss (DAM): the volume-sampled negatives, the row exchange, and its gradients across ranks."""

import json

import pytest
import torch
from ddp_worker import exchange_case, grads, gram_model_and_batch, run_ranks

from gram_ray.matching import NEGATIVE_FLOOR, sample_negatives, sampling_weights


def test_negatives_follow_the_volume_softmax_and_never_the_positive():
    torch.manual_seed(0)
    logits = torch.randn(3, 6) * 2  # -volume / T of 3 captions against 6 clips
    positives = torch.tensor([0, 2, 5])
    draws = 40_000
    counts = torch.zeros(3, 6)
    for _ in range(draws // 1000):
        drawn = sample_negatives(logits.repeat_interleave(1000, 0), positives.repeat_interleave(1000), torch.rand(3000))
        counts += torch.nn.functional.one_hot(drawn.view(3, 1000), 6).sum(1)
    expected = torch.softmax(logits, 1) + NEGATIVE_FLOOR
    expected[torch.arange(3), positives] = 0
    expected /= expected.sum(1, keepdim=True)
    assert counts[torch.arange(3), positives].sum() == 0  # a positive is never drawn
    assert (counts / draws - expected).abs().max() < 0.01  # 4 sigma at 40,000 draws
    assert torch.equal(sampling_weights(logits, positives) > 0, expected > 0)


def test_the_row_exchange_sends_each_row_to_who_asked_with_its_gradient(tmp_path):
    result, runs = run_ranks("exchange", tmp_path)
    assert [code for code, _ in runs] == [0, 0], [err[-3000:] for _, err in runs]
    cases = [exchange_case(r, 2) for r in range(2)]
    everything = torch.cat([rows for rows, _ in cases])  # the global batch, as one process sees it
    fetched = torch.cat([everything[wanted] for _, wanted in cases])
    each = torch.arange(1.0, 9.0, dtype=torch.float64).view(4, 2)  # what each rank weights its 4 fetched rows by
    (fetched * torch.cat([each, each])).sum().backward()
    assert torch.equal(result["fetched"], fetched.detach())
    expected_grad = torch.cat([rows.grad for rows, _ in cases])
    assert torch.equal(result["grad"], expected_grad)


def test_dam_gradients_on_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path):
    # The whole GRAM objective at tiny sizes: volume loss (exact gather) + 0.1 x DAM, negatives drawn by the
    # volume with the same uniforms, condition features exchanged between the ranks with gradient.
    ddp, runs = run_ranks("gram-dam", tmp_path)
    assert [code for code, _ in runs] == [0, 0], [err[-3000:] for _, err in runs]
    model, batch = gram_model_and_batch(matching=True)
    out = model(batch)
    assert out.matching_loss is not None and out.matching_loss > 0
    out.loss.backward()
    expected = grads(model)
    assert ddp.keys() == expected.keys()
    assert any(".crossattention." in k for k in expected) and any(k.startswith("fusion.") for k in expected)
    for name in expected:
        torch.testing.assert_close(ddp[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("itm_ratio", [0.0, 0.1])
def test_matching_weight_zero_leaves_the_fusion_out(itm_ratio):
    model, batch = gram_model_and_batch(matching=itm_ratio > 0)
    assert (model.fusion is not None) == (itm_ratio > 0)
    assert (model(batch).matching_loss is not None) == (itm_ratio > 0)


def test_rerank_reorders_only_the_top_k_in_both_directions():
    from gram_ray.retrieval.metrics import retrieval_metrics
    from gram_ray.retrieval.rerank import rerank_metrics, rerank_pairs

    torch.manual_seed(0)
    volumes = torch.rand(6, 6)  # captions x clips; caption i describes clip i
    truth = torch.arange(6).numpy()
    oracle = lambda pairs: 20.0 * (pairs[:, 0] == pairs[:, 1]).float() - 10  # noqa: E731 - a sure, right head
    by_volume = retrieval_metrics(volumes, truth, higher_is_better=False)
    for kind in ("rerank", "rerank_plus_volume"):
        assert rerank_metrics(volumes, truth, 6, oracle, 0.07)[kind]["t2v"]["R@1"] == 100.0  # all are candidates
        in_top2 = (volumes.argsort(1)[:, :2] == torch.arange(6)[:, None]).any(1).float().mean().item() * 100
        assert rerank_metrics(volumes, truth, 2, oracle, 0.07)[kind]["t2v"]["R@1"] == pytest.approx(in_top2)
    # a match head that says nothing (log-odds 0) keeps the volume's order within the top k: same R@1 at k = 1,
    # and for the combined score, which then is the volume's own order, the same metrics with every clip a candidate
    unsure = lambda pairs: torch.zeros(len(pairs))  # noqa: E731
    flat = rerank_metrics(volumes, truth, 1, unsure, 0.07)["rerank"]
    assert flat["t2v"]["R@1"] == by_volume["t2v"]["R@1"] and flat["v2t"]["R@1"] == by_volume["v2t"]["R@1"]
    combined = rerank_metrics(volumes, truth, 6, unsure, 0.07)["rerank_plus_volume"]
    assert combined == {d: by_volume[d] for d in ("t2v", "v2t")}
    pairs = rerank_pairs(volumes, 2)
    assert len(pairs) == len(torch.unique(pairs, dim=0)) <= 2 * 6 * 2  # each pair scored once


def test_combined_rerank_weighs_the_head_against_the_volume_at_the_models_temperature():
    """A candidate the head prefers by log-odds L overtakes one the volume prefers by gap g only when L > g / T."""
    from gram_ray.retrieval.rerank import pair_scores

    volumes = torch.tensor([0.50, 0.57])  # the first is better by the volume, by one temperature (0.07)
    for head, winner in ((torch.tensor([0.0, 0.9]), 0), (torch.tensor([0.0, 1.1]), 1)):
        assert pair_scores(volumes, head, "match_plus_volume", 0.07).argmax().item() == winner
    assert pair_scores(volumes, torch.tensor([0.0, 0.1]), "match", 0.07).argmax().item() == 1  # GRAM's: head only
    with pytest.raises(ValueError, match="match_plus_volume"):
        pair_scores(volumes, volumes, "cosine", 0.07)


def test_training_with_dam_reports_the_matching_loss_and_rerank_metrics():
    from tiny import random_rows, tiny_config

    from gram_ray.data.collate import Collate, epoch_batches
    from gram_ray.data.text import build_word_vocab
    from gram_ray.train.loop import run_training

    cfg = tiny_config("model.text.cross_attention=true", "model.itm_ratio=0.1", "train.epochs=1", "eval.rerank_k=3")
    train, val = random_rows(cfg, 8), random_rows(cfg, 6, seed=1)
    vocab = build_word_vocab(c for rows in (train, val) for caps in rows["captions"] for c in caps)
    collate, reports = Collate(cfg, vocab, train=True), []
    last = run_training(
        cfg,
        train_batches=lambda epoch, skip: epoch_batches(train, 4, collate, epoch, skip),
        val_batches=lambda: [Collate(cfg, vocab, train=False)(val)],
        steps_per_epoch=2,
        report=lambda metrics, checkpoint: reports.append(metrics),
        vocab=vocab,
    )
    assert last["train/matching_loss"] > 0
    assert 0 <= last["val/rerank/text-video-audio/t2v/R@1"] <= 100
    assert 0 <= last["val/rerank_plus_volume/text-video-audio/t2v/R@1"] <= 100
    assert {"rerank", "rerank_plus_volume"} <= set(__import__("json").loads(last["val_eval"]))


@pytest.mark.ray
@pytest.mark.slow
def test_gram_ray_evaluate_reranks_as_training_evaluation_does(synth_small, ray_session, tmp_path):
    # The same checkpoint scored two ways: in the training loop's evaluation (every rank scores its clips' pairs)
    # and by `gram-ray evaluate` (a second Ray Data pass whose actors score each clip's pairs). Same pairs, same
    # model: the same rerank metrics.
    from tiny import batches, load_split, tiny_config

    from gram_ray.data.collate import Collate, epoch_batches
    from gram_ray.data.preprocess import preprocess
    from gram_ray.data.text import build_word_vocab
    from gram_ray.model.checkpoint import load_checkpoint
    from gram_ray.retrieval.inference import evaluate_checkpoint
    from gram_ray.train.loop import run_training

    cfg = tiny_config("model.text.cross_attention=true", "model.itm_ratio=0.1", "train.epochs=1", "eval.rerank_k=4")
    train, val = load_split(synth_small, "train", cfg), load_split(synth_small, "val", cfg)
    vocab = build_word_vocab(c for rows in (train, val) for caps in rows["captions"] for c in caps)
    saved = {}

    def report(metrics, checkpoint):
        if checkpoint is not None:
            checkpoint.write(tmp_path / "ckpt")
            saved["metrics"] = metrics

    collate = Collate(cfg, vocab, train=True)
    run_training(
        cfg,
        train_batches=lambda epoch, skip: epoch_batches(train, cfg.train.batch_size, collate, epoch, skip),
        val_batches=lambda: batches(val, 64, Collate(cfg, vocab, False), drop_last=False),
        steps_per_epoch=len(train["id"]) // cfg.train.batch_size,
        report=report,
        vocab=vocab,
    )
    assert load_checkpoint(tmp_path / "ckpt")["config"]["model"]["itm_ratio"] == 0.1
    val_data = cfg.data.model_copy(deep=True)
    val_data.video.cache_codec = "raw"  # the loop's evaluation above read frames decoded straight from the videos
    preprocess(synth_small["val"], synth_small["videos"], tmp_path / "val", val_data, audio_dir=synth_small["audios"])
    metrics = evaluate_checkpoint(tmp_path / "ckpt", tmp_path / "val")
    for kind in ("rerank", "rerank_plus_volume"):
        expected = json.loads(saved["metrics"]["val_eval"])[kind]["text-video-audio"]
        got = metrics[kind]["text-video-audio"]
        for direction in ("t2v", "v2t"):
            for key, value in expected[direction].items():
                assert got[direction][key] == pytest.approx(value, abs=1e-6), (kind, direction, key)


def test_the_match_head_learns_which_clip_a_caption_belongs_to():
    # The fusion's whole job: say whether a caption and a clip belong together. On 8 random clips with distinct
    # captions, trained by volume + DAM (negatives drawn by the volume), the match head must leave the base rate
    # of its 1:2 labels (cross-entropy 0.6365) and, as a reranker uses it, put most captions' own clip first of 8.
    from tiny import random_rows, tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.text import build_word_vocab
    from gram_ray.model.gram import build_model

    cfg = tiny_config("model.text.cross_attention=true", "model.itm_ratio=1.0")
    rows = random_rows(cfg, 8)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    batch = Collate(cfg, vocab, train=True)(rows)
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        out = model(batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.matching_loss.item())
    assert sum(losses[:20]) / 20 > 0.6 and sum(losses[-20:]) / 20 < 0.3, losses[::20]
    model.eval()
    with torch.no_grad():
        condition = model.condition(model.encode(batch))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pairs = torch.cartesian_prod(torch.arange(8), torch.arange(8))  # every caption with every clip
        probs = model.match_logits(ids[pairs[:, 0]], mask[pairs[:, 0]], condition[pairs[:, 1]]).softmax(-1)[:, 1]
    probs = probs.view(8, 8)
    own_clip_first = (probs.argmax(1) == torch.arange(8)).sum().item()  # R@1 by the match head; chance: 1 in 8
    assert own_clip_first >= 6, probs


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_the_match_head_reads_the_fused_caption_pooled_as_the_text_encoder_pools(pooling):
    # A text encoder trained with mean pooling never puts the caption into its CLS state: on the demo a match
    # head reading that CLS stayed at the base rate for the whole run. So the fused caption is pooled the same way
    # as the plain one (GRAM's BERT: CLS).
    from tiny import random_rows, tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.text import build_word_vocab
    from gram_ray.model.gram import build_model

    cfg = tiny_config("model.text.cross_attention=true", "model.itm_ratio=0.1", f"model.text.pooling={pooling}")
    rows = random_rows(cfg, 4)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    batch = Collate(cfg, vocab, train=False)(rows)
    model = build_model(cfg, vocab).eval()
    with torch.no_grad():
        condition = model.condition(model.encode(batch))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        states = model.text.backbone.fuse(ids, mask, condition, None)
        m = mask.unsqueeze(-1).float()
        pooled = states[:, 0] if pooling == "cls" else (states * m).sum(1) / m.sum(1)
        torch.testing.assert_close(model.match_logits(ids, mask, condition), model.fusion.match_head(pooled))

"""`gram-ray index` and `gram-ray search` on real caches of the synthetic clips: what the index holds, that a run
continues where it stopped and another source adds clips without recomputing the others, that search returns
the brute-force top k (and reranks with the match head), and that the gallery's thumbnails load in Chromium."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import cached_frames, in_memory, load_split, tiny_config

from gram_ray.cli import main
from gram_ray.data.collate import Collate
from gram_ray.data.parquet_layout import numpy_rows
from gram_ray.data.preprocess import preprocess
from gram_ray.data.text import build_word_vocab
from gram_ray.model.checkpoint import load_checkpoint, model_from_state
from gram_ray.retrieval.index import SearchIndexError, build_index, load_index
from gram_ray.train.loop import run_training
from gram_ray.volume import gram_volume, orthonormal_span

pytestmark = pytest.mark.ray

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def trained(synth_small, ray_session, tmp_path_factory):
    """A tiny model with the matching loss trained one epoch on the synthetic train split, and a val cache."""
    tmp = tmp_path_factory.mktemp("index")
    cfg = tiny_config("model.text.cross_attention=true", "model.itm_ratio=0.1", "train.epochs=1", "eval.rerank_k=4")
    train, val = load_split(synth_small, "train", cfg), load_split(synth_small, "val", cfg)
    vocab = build_word_vocab(c for rows in (train, val) for caps in rows["captions"] for c in caps)

    def report(metrics, checkpoint):
        if checkpoint is not None:
            checkpoint.write(tmp / "ckpt")

    run_training(cfg, **in_memory(cfg, train, vocab), report=report)
    data = cfg.data.model_copy(deep=True)
    data.shard_mb = 0.01  # several cache files: several index shards
    val_cache = tmp / "val-cache"
    preprocess(
        synth_small["val"], synth_small["videos"], val_cache, data, audio_dir=synth_small["audios"], log=lambda m: 0
    )
    return {"ckpt": str(tmp / "ckpt"), "val_cache": str(val_cache), "cfg": cfg, "tmp": tmp, "data": data}


@pytest.fixture(scope="module")
def built(trained, tmp_path_factory):
    """The val cache indexed once; tests that change an index work on a copy."""
    out = tmp_path_factory.mktemp("built") / "index"
    build_index(trained["ckpt"], trained["val_cache"], str(out), log=lambda m: 0)
    return out


def _embed_cache(ckpt: str, cache: str) -> dict:
    """The model's embeddings of a cache's clips, computed directly (no Ray): what the index must hold."""
    import pyarrow.parquet as pq

    model, cfg = model_from_state(load_checkpoint(ckpt))
    model.eval()
    rows = numpy_rows(pq.read_table(Path(cache) / "shards"))
    batch = Collate(cfg, load_checkpoint(ckpt)["vocab"], train=False)(rows)
    with torch.no_grad():
        emb = model.embed(batch)
    return {"ids": batch["ids"], "rows": rows, **emb, "text_to_video": batch["text_to_video"]}


def test_index_holds_each_clips_embeddings_basis_thumbnail_and_media(trained, built):
    index = load_index(built)
    meta = index.meta
    want = _embed_cache(trained["ckpt"], trained["val_cache"])
    assert meta["clips"] == len(index.ids) == len(want["ids"]) and meta["modalities"] == ["video", "audio"]
    order = [want["ids"].index(i) for i in index.ids]
    for m in ("video", "audio"):
        torch.testing.assert_close(index.clips.embeddings[m], want[m][order], atol=1e-5, rtol=0)
    basis, vol_sq = orthonormal_span(want["video"][order], want["audio"][order])
    torch.testing.assert_close(index.clips.basis.double(), basis, atol=1e-5, rtol=0)
    torch.testing.assert_close(index.clips.span_volume_sq.double(), vol_sq, atol=1e-5, rtol=0)
    # every caption, with its own embedding, belongs to its clip
    for row, clip_id in enumerate(index.ids):
        mine = want["text"][want["text_to_video"] == want["ids"].index(clip_id)]
        torch.testing.assert_close(index.caption_embeddings[index.caption_clip == row], mine, atol=1e-5, rtol=0)
    # the thumbnail is the clip's middle cached frame (JPEG), the media its own files
    from torchvision.io import decode_jpeg

    first = want["ids"].index(index.ids[0])
    frames = cached_frames({k: v[first] for k, v in want["rows"].items()})
    thumb = decode_jpeg(torch.frombuffer(bytearray(index.thumbnails[0]), dtype=torch.uint8))
    assert thumb.shape == frames.shape[1:]
    middle = torch.from_numpy(frames[len(frames) // 2]).float()
    assert (thumb.float() - middle).abs().mean() < 1  # the cache's own JPEG of that frame
    assert all(Path(p).name.startswith(i) for p, i in zip(index.video_paths, index.ids, strict=True))
    assert all(Path(p).is_file() for p in index.video_paths + index.audio_paths)


def test_an_index_run_continues_and_another_source_adds_clips_without_recomputing(
    trained, built, tmp_path, synth_small
):
    out = tmp_path / "index"
    shutil.copytree(built, out)
    shards = sorted((out / "shards").glob("*.parquet"))
    assert len(shards) >= 3
    # a run stopped before its last file was recorded: the next run redoes that file only
    lost = shards[-1]
    lost.unlink()
    (out / "_done" / (lost.stem + ".json")).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    logs = []
    build_index(trained["ckpt"], trained["val_cache"], str(out), log=logs.append)
    assert any(f"resuming: {len(shards) - 1} of {len(shards)} cache files" in m for m in logs), logs
    assert lost.exists() and {p.name: p.stat().st_mtime_ns for p in shards[:-1]} == before
    n_val = load_index(out).meta["clips"]

    # another source: the train split through `gram-ray index --annotations` (preprocessed first); the val clips'
    # shards are not touched, and clips already in the index are not embedded again
    runner = CliRunner()
    args = ["index", "--checkpoint", trained["ckpt"], "--out", str(out), "--annotations", synth_small["all"]]
    result = runner.invoke(main, [*args, "--video-dir", synth_small["videos"], "--audio-dir", synth_small["audios"]])
    assert result.exit_code == 0, result.output
    assert f"{n_val} clips already in the index are skipped" in result.output
    index = load_index(out)
    assert len(index.ids) == len(set(index.ids)) == 24  # all.json: the val clips and the train clips, once each
    assert len(index.meta["sources"]) == 2 and index.meta["clips"] == 24
    assert {p.name: p.stat().st_mtime_ns for p in shards[:-1]} == before

    # embeddings of another model are refused
    other = tmp_path / "other-ckpt"
    shutil.copytree(trained["ckpt"], other)
    with pytest.raises(SearchIndexError, match="not comparable"):
        build_index(str(other), trained["val_cache"], str(out), log=lambda m: 0)


def _chromium_dom(page: Path) -> str:
    with tempfile.TemporaryDirectory() as profile:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
        flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
        out = subprocess.run(
            [CHROMIUM, *flags, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
    return out.stdout


def test_search_finds_the_brute_force_top_k_reranks_and_writes_a_gallery(trained, built, tmp_path):
    out = built
    index = load_index(out)
    query = index.captions[2][0]
    runner = CliRunner()
    base = ["search", "--index", str(out), query, "-k", "3"]
    result = runner.invoke(main, [*base, "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "g.html")])
    assert result.exit_code == 0, result.output
    hits = json.loads((tmp_path / "r.json").read_text())[0]["hits"]

    from gram_ray.retrieval.query import Searcher

    text = Searcher(str(out), device="cpu").embed_captions([query])
    brute = gram_volume(text, index.clips.embeddings["video"], index.clips.embeddings["audio"])[0]
    want = brute.topk(3, largest=False)
    assert [h["id"] for h in hits] == [index.ids[j] for j in want.indices.tolist()]
    np.testing.assert_allclose([h["volume"] for h in hits], want.values.numpy(), rtol=1e-5)
    assert query in result.output and index.ids[want.indices[0]] in result.output

    # reranked by the match head with the combined score: the top 4 by volume, reordered
    result = runner.invoke(main, [*base, "--rerank", "--json", str(tmp_path / "rr.json")])
    assert result.exit_code == 0, result.output
    reranked = json.loads((tmp_path / "rr.json").read_text())[0]
    assert reranked["score"] == "rerank:match_plus_volume"
    assert {h["id"] for h in reranked["hits"]} <= {index.ids[j] for j in brute.topk(4, largest=False).indices.tolist()}
    scores = [h["score"] for h in reranked["hits"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= h["match_probability"] <= 1 for h in reranked["hits"])
    temperature = load_checkpoint(trained["ckpt"])["model"]["loss_fn.log_temperature"].exp().item()
    for h in reranked["hits"]:  # the combined score: the head's log-odds - volume / temperature
        p = h["match_probability"]
        assert h["score"] == pytest.approx(np.log(p / (1 - p)) - h["volume"] / temperature, abs=1e-3)

    # clip -> captions
    result = runner.invoke(main, ["search", "--index", str(out), "--clip", index.ids[0], "-k", "2"])
    assert result.exit_code == 0 and f"clip {index.ids[0]}" in result.output

    page = tmp_path / "g.html"
    html = page.read_text()
    assert html.count('class="thumbnail"') == 3 and html.count("<video") == 3 and html.count("<audio") == 3
    for src in __import__("re").findall(r'<video controls preload="none" src="([^"]+)"', html):
        assert (page.parent / src).resolve().is_file()
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    dom = _chromium_dom(page)
    assert 'data-thumbnails-loaded="3"' in dom and 'data-thumbnails-broken="0"' in dom, dom[:500]


def test_search_errors_name_the_problem(tmp_path, trained):
    runner = CliRunner()
    result = runner.invoke(main, ["search", "--index", str(tmp_path / "none"), "a dog"])
    assert result.exit_code != 0 and "is not a gram-ray index" in result.output
    result = runner.invoke(main, ["index", "--checkpoint", trained["ckpt"], "--out", str(tmp_path / "i")])
    assert result.exit_code != 0 and "give either --data" in result.output
    with pytest.raises(SearchIndexError, match="not a preprocessed cache"):
        build_index(trained["ckpt"], str(tmp_path), str(tmp_path / "i"), log=lambda m: 0)
    assert os.path.isdir(trained["val_cache"])


def test_an_index_in_a_bucket_is_built_continued_and_searched_there(trained, built, s3):
    # The index on storage through the S3 API (a local moto server): written by the Ray actors, read by search.
    from gram_ray import storage
    from gram_ray.retrieval.query import Searcher

    out = f"{s3.bucket()}/indexes/val"
    build_index(trained["ckpt"], trained["val_cache"], out, log=lambda m: 0)
    assert storage.exists(f"{out}/index.json") and storage.list_files(f"{out}/shards", ".parquet")
    logs = []
    build_index(trained["ckpt"], trained["val_cache"], out, log=logs.append)
    assert any("are indexed already" in m for m in logs), logs  # nothing to redo
    index = load_index(out)
    assert index.meta["clips"] == len(index.ids) == len(load_index(built).ids)
    query = index.captions[1][0]
    (result,) = Searcher(out, device="cpu").search([query], k=2)
    (local,) = Searcher(str(built), device="cpu").search([query], k=2)  # the same clips, indexed locally
    assert [h.id for h in result.hits] == [h.id for h in local.hits]
    assert [h.volume for h in result.hits] == pytest.approx([h.volume for h in local.hits], rel=1e-6)


def test_gallery_shows_an_image_as_itself_and_an_audio_clip_with_its_player(tmp_path):
    from gram_ray.retrieval.gallery import render_gallery
    from gram_ray.retrieval.query import Hit, QueryResult

    (tmp_path / "media").mkdir()
    for name in ("1000092795.jpg", "rain.wav"):
        (tmp_path / "media" / name).write_bytes(b"x")
    image = Hit(
        1, "1000092795.jpg", 0.2, 0.2, ["two men outside"], None, str(tmp_path / "media" / "1000092795.jpg"), None
    )
    sound = Hit(1, "rain", 0.3, 0.3, ["rain on a roof"], None, None, str(tmp_path / "media" / "rain.wav"))
    uri = Hit(2, "c", 0.4, 0.4, ["x"], None, "s3://bucket/videos/c.mp4", None)
    page = render_gallery([QueryResult("q", "volume", [image, sound, uri])], tmp_path / "g.html", "t")
    assert '<a href="media/1000092795.jpg">full image</a>' in page and "<video" not in page
    assert '<audio controls preload="none" src="media/rain.wav">' in page and "no video" in page
    assert "video: s3://bucket/videos/c.mp4" in page  # a browser cannot open s3://: shown as text

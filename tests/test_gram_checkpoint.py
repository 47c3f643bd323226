"""Starting from GRAM's released checkpoints: every key of GRAM's model has its place (or its documented reason),
at full size and at tiny sizes, and an imported model embeds exactly as the one it was exported from."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import GRAM_ENCODERS, gram_layout_checkpoint, random_rows, tiny_config, tiny_recipe

from gram_ray import storage
from gram_ray.cli import main
from gram_ray.config import load_config, save_config
from gram_ray.data.collate import Collate
from gram_ray.data.text import build_word_vocab
from gram_ray.model.checkpoint import init_weights
from gram_ray.model.gram import build_model
from gram_ray.model.gram_checkpoint import UNUSED, gram_ray_to_gram, import_gram_state, model_shapes
from gram_ray.model.safe_load import load_weights


def test_every_key_of_a_full_size_gram_checkpoint_fits_the_gram_config(shared_data):
    listing = json.loads((shared_data / "gram-reference" / "gram_checkpoint_keys.json").read_text())["keys"]
    assert len(listing) == 1288
    source = {k: torch.empty(v["shape"], device="meta") for k, v in listing.items()}
    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(configs / "msrvtt.yaml", ["model.modalities=[text,video,audio,subtitle]"])
    shapes = model_shapes(cfg)  # GRAM's model at full size, on the meta device
    imported = import_gram_state(source, shapes)
    state, unused, report = imported.state, imported.unused, imported.report
    assert report.complete, report.lines()
    # every tensor of gram-ray's model (encoders, heads, temperature, fusion and match head), shapes equal
    assert report.loaded == len(shapes) == len(state) == 1116
    assert not imported.spare  # every part of GRAM's model is in this one
    assert len(unused) == 1288 - 1116 and set(report.unused) == set(unused)  # the rest kept, each with its reason
    assert report.resized == [  # GRAM's frame embeddings were made for 2 frames; msrvtt.yaml trains with 4
        "vision_frame_embedding: [1, 2, 768] -> [1, 4, 768] (other frame counts)"
    ]
    assert all(any(k.startswith(p) for p in UNUSED) for k in unused)


def _tiny_gram_checkpoint(tmp_path):
    """A GRAM checkpoint at tiny sizes: a tiny gram-ray model exported under GRAM's names, plus GRAM's keys that
    gram-ray does not load (the matching head, the fusion's embeddings, EVA-CLIP's text tower, ...)."""
    cfg = tiny_config(*GRAM_ENCODERS, "model.text.cross_attention=true", "train.batch_size=4")
    rows = random_rows(cfg, 4)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    # The text encoder's size in its config (as bert-base-uncased's 30,522 words are): what the import sees.
    cfg.model.text.config = cfg.model.text.config | {"vocab_size": len(vocab)}
    torch.manual_seed(0)
    model = build_model(cfg, None).eval()
    with torch.no_grad():
        model.loss_fn.log_temperature.fill_(-2.0)
    source = {}
    for key, value in model.state_dict().items():
        theirs = gram_ray_to_gram(key)
        assert theirs is not None, key
        source[theirs] = value.exp().reshape(()) if key == "loss_fn.log_temperature" else value  # GRAM's: a scalar
    source |= {
        "itm_head.linear1.weight": torch.randn(16, 16),
        "hidden_trans_vision_multimodal.0.weight": torch.randn(16, 16),
        "vision_frame_embedding": torch.randn(1, 2, 16),
        "vision_encoder.text.token_embedding.weight": torch.randn(8, 4),
        "vision_encoder.visual.head.weight": torch.randn(4, 16),
        "multimodal_encoder.cls.predictions.bias": torch.randn(len(vocab)),
    }
    path = tmp_path / "model_step_100.pt"
    torch.save(source, path)
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    return cfg, vocab, model, Collate(cfg, vocab, train=False)(rows), path, config


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_tiny_gram_checkpoint_imports_and_embeds_like_its_source(tmp_path, where, request):
    """From a local file to a local folder, and from a bucket to a bucket (the local S3 server): then
    model.init_from reads it from there."""
    cfg, vocab, source_model, batch, path, config = _tiny_gram_checkpoint(tmp_path)
    source, out = str(path), str(tmp_path / "imported")
    if where == "bucket":
        bucket = request.getfixturevalue("s3").bucket()
        storage.write_bytes_with(f"{bucket}/gram/{path.name}", lambda f: f.write(path.read_bytes()))
        source, out = f"{bucket}/gram/{path.name}", f"{bucket}/runs/imported"
    result = CliRunner().invoke(main, ["import-checkpoint", source, "--out", out, "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "kept, not loaded" in result.output and "MISSING" not in result.output
    state = load_weights(storage.join(out, "state.pt"))
    assert "fusion.match_head.linear1.weight" in state["spare"]  # kept for a recipe with the matching loss
    assert torch.equal(state["model"]["loss_fn.log_temperature"], torch.tensor([-2.0]))  # GRAM's t -> log t
    fresh_cfg = cfg.model_copy(deep=True)
    fresh_cfg.model.init_from = str(out)
    torch.manual_seed(123)  # other random weights: everything must come from the checkpoint
    imported = build_model(fresh_cfg, None)
    init_weights(imported, str(out), log=lambda line: None)
    imported.eval()
    with torch.no_grad():
        expected, got = source_model.embed(batch), imported.embed(batch)
    for m in expected:
        torch.testing.assert_close(got[m], expected[m], rtol=0, atol=0)


def test_a_mis_shaped_or_foreign_checkpoint_is_refused_naming_the_key(tmp_path):
    _, _, _, _, path, config = _tiny_gram_checkpoint(tmp_path)
    source = torch.load(path, weights_only=True)
    source["contra_head_t.linear.weight"] = torch.zeros(16, 7)
    source["some_new_module.weight"] = torch.zeros(2)
    torch.save(source, path)
    args = ["import-checkpoint", str(path), "--out", str(tmp_path / "out"), "--config", str(config)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "MIS-SHAPED: contra_head_t.linear.weight -> projections.text.weight" in result.output
    assert "UNEXPECTED (no place in the model): some_new_module.weight" in result.output
    assert "MISSING in the checkpoint: projections.text.weight" in result.output
    assert not (tmp_path / "out").exists()  # nothing written
    partial = CliRunner().invoke(main, [*args, "--allow-partial"])
    assert partial.exit_code == 0 and (tmp_path / "out" / "state.pt").is_file()
    torch.save({"model": {"x": torch.zeros(1)}, "step": 3}, path)  # a training state, not a state dict
    assert "not a GRAM checkpoint" in CliRunner().invoke(main, args).output


# ---- GRAM's weights in every recipe: import once, then train any config in configs/ from it ----

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The configs whose encoders are not GRAM's (EVA-CLIP, BEATs, BERT with cross-attention): GRAM's weights do not fit
# them, and model.init_from ends in one line that names the tensor and the config key.
NOT_GRAM_ENCODERS = {"demo.yaml", "demo-dam.yaml", "tune-demo.yaml", "msrvtt-hf.yaml"}
CAPTIONS = [f"clip {i} shows a {['red', 'blue'][i % 2]} shape" for i in range(4)] + ["subtitle words"]


def _tiny(recipe: Path, *extra: str):
    return tiny_recipe(recipe, len(build_word_vocab(CAPTIONS)), *extra)


@pytest.fixture(scope="module")
def gram_layout(tmp_path_factory):
    """GRAM's released checkpoint at tiny sizes: every part GRAM has (text, video, audio, subtitle, the fusion and
    match head), made for 2 frames, 1 audio window and 32 px as GRAM's pretraining was for its own counts, in GRAM's
    names and layout, with GRAM's keys gram-ray does not load. Then imported once, with the default config
    (msrvtt.yaml's recipe, tiny), as the docs say."""
    tmp = tmp_path_factory.mktemp("gram-layout")
    full = _tiny(
        CONFIGS / "msrvtt.yaml",
        "model.modalities=[text,video,audio,subtitle]",
        "data.video.num_frames=2",
        "data.video.size=32",
        "data.audio.windows=1",
    )
    path = tmp / "model_step_100.pt"
    source = gram_layout_checkpoint(full, path)
    default = tmp / "msrvtt-tiny.yaml"
    save_config(_tiny(CONFIGS / "msrvtt.yaml"), default)
    out = tmp / "gram-pretrained"
    result = CliRunner().invoke(main, ["import-checkpoint", str(path), "--out", str(out), "--config", str(default)])
    assert result.exit_code == 0, result.output
    assert "resized: vision_frame_embedding: [1, 2, 16] -> [1, 4, 16] (other frame counts)" in result.output
    assert "resized: vision_encoder.visual.pos_embed: [1, 17, 16] -> [1, 5, 16] (another vision" in result.output
    return source, out


def _expected(source: dict, key: str, shape: torch.Size) -> torch.Tensor:
    """What GRAM's code loads into a tensor of `shape` from its checkpoint's (general_module.modify_checkpoint)."""
    import torch.nn.functional as F

    value = source[gram_ray_to_gram(key)]
    if key == "loss_fn.log_temperature":
        return torch.log(value.double()).float().reshape(1)
    if value.shape == shape:
        return value
    if "part_embedding" in key:  # frames or windows: nearest
        return F.interpolate(value.permute(0, 2, 1), shape[1], mode="nearest").permute(0, 2, 1)
    grid, new = round((value.shape[1] - 1) ** 0.5), round((shape[1] - 1) ** 0.5)  # EVA's positions: bilinear
    patches = value[0, 1:].reshape(grid, grid, -1).permute(2, 0, 1).unsqueeze(0)
    patches = F.interpolate(patches, (new, new), mode="bilinear")[0].permute(1, 2, 0).reshape(-1, value.shape[-1])
    return torch.cat((value[0, :1], patches)).unsqueeze(0)


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_starts_from_the_imported_gram_checkpoint(recipe, gram_layout, capsys):
    """Each config trains a step from GRAM's weights imported once: frame and window embeddings and EVA's
    positions resized as GRAM resizes them (from GRAM's own tensors), a dropped modality's or matching loss's
    weights left out with one line, the subtitle head (absent from the import's config) filled from GRAM's; a
    config whose encoders are not GRAM's ends in one line naming the tensor and the config key."""
    from gram_ray.model.checkpoint import CheckpointError
    from gram_ray.train.loop import run_training

    source, imported = gram_layout
    cfg = _tiny(CONFIGS / recipe, f"model.init_from={imported}")
    model = build_model(cfg, None)
    if recipe in NOT_GRAM_ENCODERS:
        with pytest.raises(CheckpointError) as failure:
            init_weights(model, str(imported), log=print)
        message = str(failure.value)
        assert "\n" not in message and message.startswith(f"model.init_from={imported}: a tensor")
        assert re.search(r"(check|set by) model\.(vision|audio|text)\b", message), message
        return
    init_weights(model, str(imported), log=print)
    lines = capsys.readouterr().out
    loaded = model.state_dict()
    for key, value in loaded.items():
        if gram_ray_to_gram(key) in source:
            torch.testing.assert_close(value, _expected(source, key, value.shape), rtol=0, atol=0, msg=key)
    assert not [k for k in loaded if gram_ray_to_gram(k) not in source]  # every tensor from GRAM's checkpoint
    dropped = {"video", "audio"} - set(cfg.model.modalities)
    for modality in dropped:
        assert f"this recipe has no {modality} (model.modalities)" in lines
    assert lines.count("left out") == len(dropped) + (cfg.model.itm_ratio == 0), lines
    # ... and it trains: one optimizer step from those weights, through the loop the workers run
    rows = random_rows(cfg, 4)
    rows["subtitle"] = np.array(["subtitle words"] * 4, dtype=object)
    vocab = build_word_vocab(CAPTIONS)
    collate = Collate(cfg, vocab, train=True)
    reports, logged = [], []
    run_training(
        cfg,
        train_batches=lambda epoch, skip: iter([collate(rows)]),
        val_batches=None,
        steps_per_epoch=1,
        report=lambda metrics, checkpoint: reports.append(metrics),
        vocab=vocab,
        log=logged.append,
    )
    assert reports[-1]["step"] == 1 and math.isfinite(logged[-1]["train/loss"])

"""Starting from GRAM's released checkpoints: every key of GRAM's model has its place (or its documented reason),
at full size and at tiny sizes, and an imported model embeds exactly as the one it was exported from."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import GRAM_ENCODERS, random_rows, tiny_config

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
    state, unused, report = import_gram_state(source, shapes)
    assert report.complete, report.lines()
    # every tensor of gram-ray's model (encoders, heads, temperature, fusion and match head), shapes equal
    assert report.loaded == len(shapes) == len(state) == 1116
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
    assert "itm_head.linear1.weight" in state["gram_unused"]  # kept for the fusion, not dropped
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
    assert "MISSING in the GRAM checkpoint: projections.text.weight" in result.output
    assert not (tmp_path / "out").exists()  # nothing written
    partial = CliRunner().invoke(main, [*args, "--allow-partial"])
    assert partial.exit_code == 0 and (tmp_path / "out" / "state.pt").is_file()
    torch.save({"model": {"x": torch.zeros(1)}, "step": 3}, path)  # a training state, not a state dict
    assert "not a GRAM checkpoint" in CliRunner().invoke(main, args).output

"""GRAM's own encoders, number for number against GRAM's code (../shared/data/gram-reference), at any size."""

import pytest
import torch

from gram_ray.model.beats import BEATs, BEATsConfig
from gram_ray.model.encoders import load_beats

TOL = 1e-5


@pytest.fixture(scope="module")
def beats_reference(shared_data):
    return torch.load(shared_data / "gram-reference" / "beats_tiny.pt", weights_only=True)


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_beats_loads_grams_checkpoint_and_reproduces_every_output(beats_reference, shared_data):
    torch.manual_seed(0)
    model = load_beats(shared_data / "gram-reference" / "beats_tiny.pt")  # strict: no missing/unexpected key
    assert not model.training
    ref = beats_reference["reference"]
    captured = {}
    model.encoder.layers[0].register_forward_pre_hook(lambda m, args: captured.__setitem__("encoder_input_ln", args[0]))
    for i, layer in enumerate(model.encoder.layers):
        layer.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(f"layer{i}", out))
    with torch.no_grad():
        out = model(ref["gram_fbank"])
        assert out.shape == (1, 256, 32)  # [B, N, D]: 1024 x 64 frames -> 64 x 4 patches
        assert _max_diff(out, ref["gram_out"]) < TOL
        assert _max_diff(out.mean(1), ref["gram_pooled"]) < TOL
        assert _max_diff(model.patch_tokens(ref["rand_fbank"]), ref["rand_intermediates"]["patch_tokens"]) < TOL
        assert _max_diff(model(ref["rand_fbank"]), ref["rand_out"]) < TOL
    for name in ("encoder_input_ln", "layer0", "layer1"):
        assert _max_diff(captured[name], ref["rand_intermediates"][name]) < TOL, name


def test_beats_loads_from_the_checkpoint_dict_too(beats_reference):
    model = load_beats({"cfg": beats_reference["cfg"], "model": beats_reference["model"]})
    with torch.no_grad():
        assert (
            _max_diff(model(beats_reference["reference"]["rand_fbank"]), beats_reference["reference"]["rand_out"]) < TOL
        )


@pytest.mark.parametrize(
    "cfg",
    [
        # pre-LN, no relative bias, no gate, no projection (patch width = encoder width), odd kernel, relu
        dict(encoder_layers=3, encoder_embed_dim=24, encoder_ffn_embed_dim=40, encoder_attention_heads=3,
             layer_norm_first=True, deep_norm=False, relative_position_embedding=False, gru_rel_pos=False,
             embed_dim=24, conv_pos=15, conv_pos_groups=3, activation_fn="relu", input_patch_size=8),
        # post-LN deep-norm with the gated bias, other sizes
        dict(encoder_layers=1, encoder_embed_dim=16, encoder_ffn_embed_dim=8, encoder_attention_heads=2,
             embed_dim=12, conv_pos=4, conv_pos_groups=2, num_buckets=16, max_distance=20, input_patch_size=4,
             layer_wise_gradient_decay_ratio=0.5),
    ],
)  # fmt: skip
def test_beats_of_any_size_round_trips_through_its_checkpoint_layout(cfg, tmp_path):
    torch.manual_seed(1)
    config = BEATsConfig.from_dict(cfg)
    model = BEATs(config).eval()
    for p in model.parameters():  # no parameter may be left at a value that hides its absence
        p.data += 0.05 * torch.randn_like(p)
    path = tmp_path / "beats.pt"
    torch.save({"cfg": cfg, "model": model.state_dict()}, path)
    loaded = load_beats(path)
    p = config.input_patch_size
    fbank = torch.randn(2, 6 * p, 2 * p)
    with torch.no_grad():
        out = loaded(fbank)
        assert out.shape == (2, 12, config.encoder_embed_dim)
        assert torch.equal(out, model(fbank))


def test_beats_gradients_flow_with_checkpointing_and_layer_decay():
    cfg = dict(encoder_layers=2, encoder_embed_dim=16, encoder_ffn_embed_dim=32, encoder_attention_heads=2,
               embed_dim=8, conv_pos=4, conv_pos_groups=2, input_patch_size=4,
               layer_wise_gradient_decay_ratio=0.5)  # fmt: skip
    torch.manual_seed(0)
    plain = BEATs(BEATsConfig.from_dict(cfg)).train()
    checkpointed = BEATs(BEATsConfig.from_dict(cfg)).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.encoder.gradient_checkpointing = True
    fbank = torch.randn(2, 16, 8)
    plain(fbank).square().sum().backward()
    checkpointed(fbank).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_beats_refuses_what_is_not_a_beats_checkpoint(beats_reference):
    with pytest.raises(ValueError, match="expected the keys 'cfg' and 'model'"):
        load_beats({"state_dict": {}})
    broken = dict(beats_reference["model"])
    broken.pop("encoder.layer_norm.weight")
    with pytest.raises(ValueError, match="missing.*encoder.layer_norm.weight"):
        load_beats({"cfg": beats_reference["cfg"], "model": broken})
    with pytest.raises(ValueError, match="not divisible"):
        BEATsConfig.from_dict({"encoder_embed_dim": 10, "encoder_attention_heads": 3})


@pytest.fixture(scope="module")
def eva_reference(shared_data):
    return torch.load(shared_data / "gram-reference" / "eva_tiny.pt", weights_only=True)


def test_eva_vision_loads_grams_checkpoint_and_reproduces_every_output(eva_reference, shared_data):
    from gram_ray.model.encoders import load_eva_vision

    model = load_eva_vision(shared_data / "gram-reference" / "eva_tiny.pt", image_size=56)
    assert not model.training
    ref = eva_reference["reference"]
    visual, captured = model.visual, {}
    for name, module in (("patch_embed", visual.patch_embed), ("pos_drop", visual.pos_drop)):
        module.register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, out))
    for i, block in enumerate(visual.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(f"block{i}", out))
    with torch.no_grad():
        tokens = model(ref["images"])
    assert tokens.shape == (2, 17, 48)  # [B, 1 + P, D], CLS first
    assert _max_diff(tokens, ref["tokens"]) < TOL
    assert _max_diff(tokens[:, 0], ref["cls"]) < TOL
    # GRAM's video path: a clip's frames through the tower, their CLS averaged
    assert _max_diff(tokens.view(1, 2, 17, 48), ref["gram_video_tokens"]) < TOL
    assert _max_diff(tokens[:, 0].mean(0, keepdim=True), ref["gram_pooled"]) < TOL
    for name, expected in ref["intermediates"].items():
        assert _max_diff(captured[name], expected) < TOL, name


def test_eva_vision_from_a_flat_state_dict_needs_only_what_shapes_cannot_say(eva_reference):
    from gram_ray.model.encoders import load_eva_vision

    state = eva_reference["state_dict"]  # visual.*, text.*, logit_scale: the text tower is skipped
    model = load_eva_vision(state, image_size=56, head_width=12)
    with torch.no_grad():
        assert _max_diff(model(eva_reference["reference"]["images"]), eva_reference["reference"]["tokens"]) < TOL
    with pytest.raises(ValueError, match="pass head_width"):  # 48 wide: no known EVA-CLIP tower
        load_eva_vision(state, image_size=56)
    with pytest.raises(ValueError, match="not an EVA-CLIP vision checkpoint"):
        load_eva_vision({"text.positional_embedding": torch.zeros(1)})


def test_eva_vision_of_any_size_round_trips_and_resizes(tmp_path):
    from gram_ray.model.encoders import load_eva_vision
    from gram_ray.model.eva import build_eva_vision

    torch.manual_seed(0)
    tower = build_eva_vision(width=24, depth=3, head_width=8, mlp_hidden=50, patch_size=8, image_size=32).eval()
    for p in tower.parameters():
        p.data += 0.05 * torch.randn_like(p)
    path = tmp_path / "eva.pt"
    torch.save({"visual." + k: v for k, v in tower.visual.state_dict().items()}, path)
    loaded = load_eva_vision(path, image_size=32, head_width=8)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), tower(images))
        # another resolution: the position embedding is resampled on load (as GRAM's vision_resolution)
        assert load_eva_vision(path, image_size=48, head_width=8)(torch.randn(1, 3, 48, 48)).shape == (1, 37, 24)


def test_gram_model_with_eva_and_beats_encoders_trains_at_tiny_sizes():
    from tiny import GRAM_ENCODERS, random_rows, tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.text import build_word_vocab
    from gram_ray.model.gram import build_model

    cfg = tiny_config(*GRAM_ENCODERS)
    rows = random_rows(cfg, 4)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    batch = Collate(cfg, vocab, train=True)(rows)
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    encoded = model.encode(batch)
    frames, size, window = cfg.data.video.num_frames, cfg.data.video.size, cfg.data.audio.window_frames
    assert encoded["video"].tokens.shape == (4, frames * (1 + (size // 8) ** 2), 16)  # every frame's CLS + patches
    assert encoded["audio"].tokens.shape == (4, (window // 16) * (64 // 16), 16)  # BEATs patches of one window
    assert encoded["video"].pooled.shape == encoded["audio"].pooled.shape == (4, 16)
    assert all(p.bias is None for p in model.projections.values())  # GRAM's heads have no bias
    model(batch).loss.backward()
    for name in (
        "vision.backbone.tower.visual.blocks.0.attn.qkv.weight",
        "audio.backbone.beats.encoder.layers.0.fc1.weight",
    ):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_text_encoder_with_cross_attention_is_plain_bert_without_context(tmp_path):
    from transformers import AutoConfig, AutoModel

    from gram_ray.config import EncoderConfig
    from gram_ray.model.encoders import build_backbone

    sizes = dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, vocab_size=100)  # fmt: skip
    torch.manual_seed(0)
    plain = AutoModel.from_config(AutoConfig.for_model(**sizes), add_pooling_layer=False).eval()
    plain.save_pretrained(tmp_path / "bert")  # a local "pretrained" BERT, as bert-base-uncased would be
    fusion = build_backbone(
        EncoderConfig(pretrained=str(tmp_path / "bert"), pooling="cls", cross_attention=True), "text"
    )
    fusion.eval()
    assert len(fusion.cross_attention_parameters()) == 2 * 10  # q, k, v, output dense + LayerNorm per block
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        states, pooled = fusion(ids, mask)
        torch.testing.assert_close(states, plain(input_ids=ids, attention_mask=mask).last_hidden_state)
        assert torch.equal(pooled, states[:, 0])
        changed = ids.clone()
        changed[0, 4] = (changed[0, 4] + 1) % 100
        assert not torch.equal(fusion(changed, mask)[0][0, 0], states[0, 0])  # bidirectional: CLS sees token 4
        fused = fusion.fuse(ids, mask, torch.randn(2, 5, 32), None)
    assert fused.shape == states.shape and not torch.allclose(fused, states)


def test_gram_model_under_ddp_on_two_gloo_processes_equals_one_process(tmp_path):
    # GRAM's encoders at tiny sizes (EVA-CLIP tower, BEATs, BERT with its cross-attention frozen until the
    # fusion uses it), the exact gather: two ranks of 4 rows give the gradients of one process over all 8.
    from ddp_worker import grads, gram_model_and_batch, run_ranks

    ddp, results = run_ranks("gram", tmp_path)
    assert [code for code, _ in results] == [0, 0], [err[-3000:] for _, err in results]
    model, batch = gram_model_and_batch()
    model(batch).loss.backward()
    expected = grads(model)
    assert ddp.keys() == expected.keys() and not any(".crossattention." in k for k in expected)
    for name in expected:
        torch.testing.assert_close(ddp[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)

"""A tiny GRAM config and in-memory batches for tests that run the model or the loop without Ray."""

import numpy as np

from gram_ray.config import load_config
from gram_ray.data.audio import decode_audio
from gram_ray.data.manifest import read_annotations, resolve_media
from gram_ray.data.schema import object_column
from gram_ray.data.video import decode_video
from gram_ray.demo import DEMO_CONFIG

TINY = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
SIZES = ", ".join(f"{k}: {v}" for k, v in TINY.items())
OVERRIDES = [
    "data.video.num_frames=2",
    "data.video.size=16",
    "data.audio.window_frames=64",
    "model.embed_dim=16",
    "train.batch_size=4",
    "train.eval_batch_size=8",
    "train.warmup_steps=2",
    "train.log_every_steps=1",
    "train.eval_every_epochs=1",
    "wandb.enabled=false",
    # The demo trains GRAM's matching loss; tests that exercise it ask for it (model.itm_ratio, cross_attention).
    "model.itm_ratio=0",
    "model.text.cross_attention=false",
    f"model.text.config={{model_type: bert, max_position_embeddings: 32, {SIZES}}}",
    f"model.vision.config={{model_type: vit, image_size: 16, patch_size: 8, {SIZES}}}",
    "model.audio.config={model_type: audio-spectrogram-transformer, max_length: 64, num_mel_bins: 64, "
    f"frequency_stride: 16, time_stride: 16, {SIZES}}}",
]


# A run on synth_small's 16 clips that repeats exactly, checkpoint for checkpoint: 8 steps of 4 clips, a checkpoint
# every 2 (all kept), one worker, batches in the same order whatever the reads' timing (data.preserve_order). The
# storage fault tests compare such a run through faults with the same run without.
REPEATABLE_RUN = [
    "train.epochs=2",
    "train.batch_size=4",
    "train.checkpoint_every_steps=2",
    "train.keep_checkpoints=100",
    "scaling.num_workers=1",
    "data.materialize=never",
    "data.preserve_order=true",
]


def synth_data(paths: dict, val: bool = True) -> list[str]:
    """Overrides pointing a config at a synthetic dataset (gram_ray.data.synthetic.generate's paths)."""
    return [
        f"data.train_annotations={paths['train']}",
        *([f"data.val_annotations={paths['val']}"] if val else []),
        f"data.video_dir={paths['videos']}",
        f"data.audio_dir={paths['audios']}",
    ]


def cached_frames(row: dict) -> np.ndarray:
    """A cache row's frames as uint8 [(draws,) N, 3, S, S], whichever codec stored them (data.video.cache_codec)."""
    from gram_ray.data.frame_codec import decode_jpegs
    from gram_ray.data.schema import FRAMES_JPEG

    if FRAMES_JPEG in row:
        return decode_jpegs([list(row[FRAMES_JPEG])])[0].numpy()
    return np.asarray(row["frames"])


def cached_fbank(row: dict) -> np.ndarray:
    """A cache row's filterbank as float32 [A, L, mel_bins], whichever codec stored it (data.audio.cache_codec)."""
    from gram_ray.data.fbank_codec import decode_fbank
    from gram_ray.data.schema import AUDIO_FBANK_RANGE, AUDIO_FBANK_U8

    if AUDIO_FBANK_U8 in row:
        return decode_fbank(row[AUDIO_FBANK_U8], row[AUDIO_FBANK_RANGE])
    return np.asarray(row["audio_fbank"])


def tiny_config(*extra: str):
    return load_config(DEMO_CONFIG, [*OVERRIDES, *extra])


def load_split(paths: dict, split: str, cfg) -> dict:
    """A synthetic split decoded into one numpy batch, as a Parquet cache row batch would arrive."""
    rows = read_annotations(paths[split])
    resolve_media(rows, paths["videos"], paths["audios"])
    v = cfg.data.video
    return {
        "id": np.array([r.id for r in rows], dtype=object),
        "captions": object_column([r.captions for r in rows]),
        "frames": np.stack([decode_video(r.video_path, v.num_frames, v.size, "eval") for r in rows]),
        "audio_fbank": np.stack([decode_audio(r.audio_path, None, cfg.data.audio) for r in rows]),
        "has_audio": np.ones(len(rows), dtype=bool),
    }


def batches(data: dict, size: int, collate, drop_last: bool = True):
    """In file order, unshuffled: for evaluation."""
    n = len(data["id"])
    for start in range(0, n - (size - 1 if drop_last else 0), size):
        yield collate({k: v[start : start + size] for k, v in data.items()})


# GRAM's own encoder kinds at tiny sizes: EVA-CLIP's vision tower (timm) and BEATs.
GRAM_ENCODERS = [
    "model.vision.kind=eva_clip",
    "model.vision.temporal_pooling=mean",  # GRAM averages the frames' CLS
    "model.vision.config={width: 16, depth: 1, head_width: 8, mlp_hidden: 24, patch_size: 8}",
    "model.audio.kind=beats",
    "model.audio.config={encoder_layers: 1, encoder_embed_dim: 16, encoder_ffn_embed_dim: 32, "
    "encoder_attention_heads: 2, embed_dim: 8, conv_pos: 4, conv_pos_groups: 2, num_buckets: 16, max_distance: 32}",
    "data.audio.frontend=beats",
]


def random_rows(cfg, n: int, seed: int = 0) -> dict:
    """n cache rows of the config's shapes with random media and distinct captions (no decoding)."""
    rng = np.random.default_rng(seed)
    v, a = cfg.data.video, cfg.data.audio
    return {
        "id": np.array([f"c{i}" for i in range(n)], dtype=object),
        "captions": object_column([[f"clip {i} shows a {['red', 'blue'][i % 2]} shape"] for i in range(n)]),
        "frames": rng.integers(0, 256, (n, v.num_frames, 3, v.size, v.size), dtype=np.uint8),
        "audio_fbank": rng.standard_normal((n, a.windows, a.window_frames, a.mel_bins)).astype(np.float32),
        "has_audio": np.ones(n, dtype=bool),
    }


def tiny_recipe(recipe, vocab_size: int, *extra: str):
    """A recipe of configs/ as users have it (frames, windows, modalities, matching loss, precision, checkpointing),
    its encoders at tiny sizes with random weights (GRAM's kinds stay GRAM's; text: a BERT of vocab_size words),
    4 clips of 16 px a step, one CPU worker."""
    m = load_config(recipe).model
    if m.vision.kind == "eva_clip":
        vision = "{width: 16, depth: 1, head_width: 8, mlp_hidden: 24, patch_size: 8}"
    else:
        vision = f"{{model_type: vit, image_size: 16, patch_size: 8, {SIZES}}}"
    if m.audio.kind == "beats":
        audio = next(o.split("=", 1)[1] for o in GRAM_ENCODERS if o.startswith("model.audio.config="))
    else:
        audio = "{model_type: audio-spectrogram-transformer, max_length: 64, num_mel_bins: 64, "
        audio += f"frequency_stride: 16, time_stride: 16, {SIZES}}}"
    return load_config(
        recipe,
        [
            "model.vision.pretrained=null",
            f"model.vision.config={vision}",
            "model.audio.pretrained=null",
            f"model.audio.config={audio}",
            "model.text.pretrained=null",
            "model.tokenizer=null",
            f"model.text.config={{model_type: bert, vocab_size: {vocab_size}, max_position_embeddings: 64, {SIZES}}}",
            "model.max_text_length=16",
            "model.embed_dim=16",
            "data.video.size=16",
            "data.video.train_draws=1",
            "data.audio.window_frames=64",
            "train.global_batch_size=null",
            "train.batch_size=4",
            "train.grad_accum=1",
            "train.epochs=1",
            "train.log_every_steps=1",
            "scaling.num_workers=1",
            "scaling.use_gpu=false",
            "wandb.enabled=false",
            *extra,
        ],
    )


def gram_layout_checkpoint(cfg, path, seed: int = 7) -> dict:
    """GRAM's released checkpoint at tiny sizes, as GRAM stores it: the state dict of cfg's model (random weights)
    under GRAM's names (a scalar temperature, not its log), with GRAM's keys that gram-ray keeps but does not load.
    Saved at path; returns it."""
    import torch

    from gram_ray.model.gram import build_model
    from gram_ray.model.gram_checkpoint import gram_ray_to_gram

    torch.manual_seed(seed)
    model = build_model(cfg, None)
    source = {}
    for key, value in model.state_dict().items():
        source[gram_ray_to_gram(key)] = value.exp().reshape(()) if key == "loss_fn.log_temperature" else value
    torch.manual_seed(seed + 1)
    width = cfg.model.embed_dim
    source |= {
        "contra_head_d.linear.weight": torch.randn(width, width),
        "contra_head_va.linear.weight": torch.randn(width, width),
        "hidden_trans_subtitle_multimodal.0.weight": torch.randn(16, 16),
        "subtitle_type_embeddings": torch.randn(1, 1, 16),
        "vision_encoder.text.token_embedding.weight": torch.randn(8, 4),
        "vision_encoder.visual.head.weight": torch.randn(4, 16),
        "multimodal_encoder.cls.predictions.bias": torch.randn(8),
    }
    torch.save(source, path)
    return source


def trained_ids(state: dict) -> list[str]:
    """The ids a mid-epoch checkpoint (or its position) lists as trained on in its epoch: all of them for rows read
    without files (held in memory, as here), those of the files in progress for a cache's."""
    return [i for ids in state["epoch_progress"]["ids"].values() for i in ids]


def in_memory(cfg, rows: dict, vocab) -> dict:
    """run_training's data arguments for a train split held in memory (load_split), without Ray or a val split."""
    from gram_ray.data.collate import Collate, epoch_batches

    collate = Collate(cfg, vocab, train=True)
    return {
        "train_batches": lambda epoch, skip: epoch_batches(rows, cfg.train.batch_size, collate, epoch, skip),
        "val_batches": None,
        "steps_per_epoch": len(rows["id"]) // cfg.train.batch_size,
        "vocab": vocab,
    }


def saved(checkpoint) -> dict:
    """A run_training report's checkpoint (a TakenCheckpoint) as state.pt holds it: written to a folder, loaded."""
    import tempfile
    from pathlib import Path

    from gram_ray.model.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(checkpoint.write(Path(tmp)))

"""The configuration's sections: one pydantic model per section of the YAML, each key with its type, default and
description (`gram-ray config-reference` prints them), and the rules that tie keys together, one validator each.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gram_ray.config.world import WorldSizeError, plans_for_range

# The modalities a config may name; data/schema.py's MODALITIES holds how each is cached, batched and encoded (a
# test checks that the two agree).
MODALITY_NAMES = ("text", "video", "audio", "subtitle")

__all__ = [
    "MODALITY_NAMES",
    "VideoConfig",
    "AudioConfig",
    "SourceFields",
    "SourceConfig",
    "DataConfig",
    "EncoderConfig",
    "VisionEncoderConfig",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "ScalingConfig",
    "RunConfig",
    "StorageConfig",
    "WandbConfig",
    "TuneConfig",
    "GramConfig",
]


class _ConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VideoConfig(_ConfigBase):
    format: Literal["video", "image", "none"] = Field(
        "video",
        description="what data.video_dir holds (GRAM's vision_format): video files; image = still images "
        "(Flickr30k, MSCOCO), each a clip of one frame, decoded without a video decoder; none = no vision at all "
        "(text-audio sets such as Clotho: no video_dir, audio from data.audio_dir)",
    )
    num_frames: int = Field(8, ge=1, description="frames per clip, one from each of N equal segments")
    size: int = Field(224, ge=8, description="short side resized to this, then centre-cropped to size x size")
    eval_num_frames: int | None = Field(None, ge=1, description="frames per val/test clip; default num_frames")
    train_draws: int = Field(
        1,
        ge=1,
        description="a training cache keeps this many independent draws of each clip's frames (one random frame "
        "per segment each); every epoch uses one, chosen by (seed, epoch, clip): new frames per epoch without "
        "decoding again, for train_draws x the cache size (data.decode_on_the_fly re-decodes every epoch instead)",
    )
    decoder: Literal["pyav", "decord"] = Field(
        "pyav",
        description="pyav decodes only the reference frames and the sampled ones (same frames, ~2x faster on "
        "H.264 with B-frames); decord decodes every frame up to the last sampled one",
    )
    cache_codec: Literal["raw", "jpeg"] = Field(
        "jpeg",
        description="how a cache stores frames: jpeg (one JPEG per frame at jpeg_quality, decoded in the input "
        "pipeline; ~1/13 of raw at 224 px and quality 90, PSNR > 40 dB) or raw uint8 tensors",
    )
    jpeg_quality: int = Field(90, ge=1, le=100, description="cache_codec jpeg: the JPEG quality of cached frames")
    decode_device: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="cache_codec jpeg: decode frames in the collate function on CPU (Ray Data's threads beside "
        "the worker), or on the training GPU in one batched nvjpeg call per batch",
    )


class AudioConfig(_ConfigBase):
    format: Literal["audio", "none"] = Field(
        "audio",
        description="audio = decode each clip's audio (data.audio_dir, else the video's track); none = no audio "
        "in the cache (image-text sets: Flickr30k, MSCOCO)",
    )
    sample_rate: int = Field(16000, ge=8000, description="audio is resampled to this rate in Hz (GRAM: 16 kHz)")
    mel_bins: int = Field(64, ge=8, description="mel filterbank bins (BEATs: 64; AST: 128)")
    frame_length_ms: float = Field(25.0, gt=0, description="filterbank frame length in ms (Kaldi's)")
    frame_shift_ms: float = Field(10.0, gt=0, description="filterbank frame shift in ms: 100 frames a second")
    windows: int = Field(1, ge=1, description="A: the filterbank is cut into this many windows")
    window_frames: int = Field(1024, ge=16, description="L: filterbank frames per window (padded or sliced)")
    frontend: Literal["ast", "beats"] = Field(
        "ast",
        description="the audio encoder's filterbank recipe (GRAM's code, one per encoder): ast = waveform mean "
        "removed, hanning window, htk_compat, (x + 4.2677393) / (2 x 4.5689974); beats = waveform x 2^15, Kaldi's "
        "povey window, (x - 15.41663) / (2 x 6.55582)",
    )
    train_windows: Literal["random", "middle"] = Field(
        "random",
        description="which L-frame slice of each of the A equal parts of a long clip a train-mode decode keeps "
        "(GRAM: random); eval-mode decodes always keep the middle one",
    )
    silence_threshold: float = Field(1e-4, ge=0, description="peak |amplitude| below this counts as silent")
    cache_codec: Literal["uint8", "float32"] = Field(
        "uint8",
        description="how a cache stores the filterbank: uint8 = each window mapped from its [min, max] onto 8 bits "
        "(a quarter of float32; error at most (max - min) / 510, 0.0065 on the real clips), turned back into float32 "
        "by the input pipeline; float32 = as computed",
    )
    missing: Literal["skip", "silence"] = Field(
        "skip",
        description="a clip with no audio anywhere (no audio file or member, no track in the video) or only "
        "silence: skip = leave it out, its reason counted in the report; silence = keep it, flagged "
        "has_audio=false (its filterbank is zeros, never used as real audio)",
    )

    @model_validator(mode="before")
    @classmethod
    def _allow_missing(cls, values):
        """allow_missing: true|false, the key before `missing` existed, still reads."""
        if isinstance(values, dict) and "allow_missing" in values:
            values = dict(values)
            values.setdefault("missing", "silence" if values.pop("allow_missing") else "skip")
        return values


class SourceFields(_ConfigBase):
    """Which field of a manifest row (or of a WebDataset sample's json, or a video2dataset Parquet row) holds what.
    A field that is not set is looked for under its usual names."""

    id: str | None = Field(
        None,
        description="the clip's id; default: GRAM's id fields (clip_id, video_id, image_id, image, id) for "
        "manifests, the sample's key for WebDataset shards and video2dataset Parquet",
    )
    video: str | None = Field(
        None,
        description="manifest: the video's path or URI (relative paths under data.video_dir), or a media id looked "
        "up as <video_dir>/<id>.<ext>; default: the clip id. video2dataset Parquet: the column of video bytes "
        "(default mp4)",
    )
    audio: str | None = Field(
        None,
        description="manifest: a separate audio file's path or URI; default: <audio_dir>/<id>.<ext> when "
        "data.audio_dir is set, else the video's own track",
    )
    captions: list[str] = Field(
        ["desc", "caption", "captions", "vast_cap"],
        description="caption fields, in order; the first present is used. A name, or a pattern such as "
        "caption_* (every matching field, in numeric order); a field may hold one string or a list",
    )
    subtitle: str | None = Field("subtitle", description="the subtitle field, when there is one")
    start: str | None = Field(None, description="the clip's start in seconds within the video (with end)")
    end: str | None = Field(None, description="the clip's end in seconds within the video (with start)")


class SourceConfig(_ConfigBase):
    """What data.train_annotations / val_annotations name, and how to read it (docs/data.md)."""

    kind: Literal["gram", "manifest", "webdataset", "parquet"] = Field(
        "gram",
        description="gram = GRAM's annotation JSON/JSONL/CSV next to media folders; manifest = rows (JSON, JSONL, "
        "CSV, Parquet) whose fields (data.source.fields) name the video, captions and an optional span; "
        "webdataset = tar shards (a brace pattern, one tar, or a folder of them), e.g. video2dataset's; "
        "parquet = video2dataset's Parquet output, the media bytes in a column",
    )
    fields: SourceFields = SourceFields()
    video_extensions: list[str] = Field(
        ["mp4", "webm", "mkv"], description="webdataset: the member extensions that hold the video, in order"
    )
    audio_extensions: list[str] = Field(
        ["m4a", "wav", "flac", "mp3"], description="webdataset: a separate audio member (else the video's track)"
    )
    caption_extension: str = Field("txt", description="webdataset: the caption member (used when the json has none)")
    json_extension: str = Field("json", description="webdataset: the metadata member")
    status_field: str = Field(
        "status",
        description="webdataset and parquet: a sample whose metadata has this field with a value other than "
        "success (video2dataset's failed_to_download, ...) is skipped, its reason counted",
    )
    max_member_mb: float = Field(
        256,
        gt=0,
        description="webdataset and parquet: a video or audio larger than this is skipped, not read. A decode "
        "task holds one sample's members at a time plus its output buffer (data.shard_mb), so this bounds its "
        "memory whatever a shard's size",
    )

    @model_validator(mode="after")
    def _span_fields(self):
        if (self.fields.start is None) != (self.fields.end is None):
            raise ValueError("data.source.fields: set start and end together (a clip is the span between them)")
        return self


class DataConfig(_ConfigBase):
    source: SourceConfig = SourceConfig()
    val_source: SourceConfig | None = Field(
        None,
        description="the val split's source when it differs from the train split's (pretraining from WebDataset "
        "shards, validating on MSR-VTT's annotation file and videos, say); default: data.source",
    )
    video: VideoConfig = VideoConfig()
    audio: AudioConfig = AudioConfig()
    max_failure_share: float = Field(
        0.1, ge=0, le=1, description="stop preprocessing when more than this share of clips cannot be decoded"
    )
    decode_on_the_fly: bool = Field(
        False, description="skip the Parquet cache and decode every epoch (train-mode random frames each time)"
    )
    shard_mb: float = Field(
        32,
        gt=0,
        description="decoded megabytes per Parquet file; a writer buffers about this much (times ~15 in Arrow and "
        "Parquet copies) before writing, so it bounds each decode worker's memory",
    )
    decode_batch_size: int = Field(4, ge=1, description="clips per Ray Data decode task batch")
    decode_concurrency: int | None = Field(
        None,
        ge=1,
        description="decode tasks at once; default one per CPU of the cluster, but at most one per core on a "
        "single machine whose Ray offers more logical CPUs than it has cores",
    )
    materialize: Literal["auto", "always", "never"] = Field(
        "auto",
        description="keep the decoded train/val data in Ray's object store instead of re-reading Parquet every "
        "epoch; auto: when the cache takes less than a quarter of the object store",
    )
    preserve_order: bool = Field(
        False,
        description="hand the workers their batches in the same order every run (Ray Data's preserve_order): a "
        "run then repeats bit for bit on the same hardware and world size, whatever the timing of reads (a slow or "
        "retried read holds back the blocks after it); off, blocks go to training as they are ready",
    )
    # Where a training run finds its data (preprocessed into cache_dir/<split> on first use): what
    # data.source.kind reads (annotation files, manifests, tar shards or Parquet files).
    train_annotations: str | None = Field(
        None, description="the train split: GRAM's JSON, a manifest or shards (data.source.kind), a path or URI"
    )
    val_annotations: str | None = Field(
        None, description="the val split evaluated during training (read as data.val_source, else data.source)"
    )
    video_dir: str | None = Field(None, description="the videos (or images) by id: a folder path or storage URI")
    audio_dir: str | None = Field(
        None, description="separate audio files by id (a path or URI); default: each video's own track"
    )
    cache_dir: str | None = Field(None, description="Parquet caches; default <run output>/cache")

    @model_validator(mode="after")
    def _packed_sources_are_cached(self):
        if self.decode_on_the_fly and self.source.kind in ("webdataset", "parquet"):
            raise ValueError(
                f"data.decode_on_the_fly decodes manifest rows every epoch; {self.source.kind} shards are decoded "
                "into a cache once (set data.decode_on_the_fly=false)"
            )
        return self


class EncoderConfig(_ConfigBase):
    """One modality's encoder: pretrained weights (a name or local path), or random weights from a config."""

    kind: Literal["hf", "eva_clip", "beats"] = Field(
        "hf",
        description="hf: a Hugging Face AutoModel; eva_clip: EVA-CLIP's vision tower through timm (GRAM's "
        "EVA01-CLIP-g/14; vision only); beats: BEATs (GRAM's audio encoder; audio only)",
    )
    pretrained: str | None = Field(
        None,
        description="hf: a Hugging Face name or local path; eva_clip: an EVA-CLIP .pt (e.g. "
        "EVA01_CLIP_g_14_psz14_s11B.pt); beats: a BEATs .pt (e.g. BEATs_iter3_plus_AS2M.pt)",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="random init. hf: Hugging Face config fields with model_type (e.g. 'bert'); eva_clip: width, "
        "depth, head_width, mlp_hidden, patch_size; beats: a BEATs cfg (encoder_layers, encoder_embed_dim, ...)",
    )
    pooling: Literal["cls", "mean"] = Field("mean", description="hf only: CLS token or mean of the token states")
    freeze: bool = Field(False, description="no gradient for this encoder (GRAM: frozen_vision, frozen_audio)")
    cross_attention: bool = Field(
        False,
        description="text only: a cross-attention layer in every block (GRAM's fusion encoder); unused, and frozen, "
        "until a matching loss uses the fusion",
    )


class VisionEncoderConfig(EncoderConfig):
    temporal_pooling: Literal["mean", "concat"] = Field(
        "mean", description="mean: order-free average of frames (the paper's); concat: keeps frame order"
    )
    drop_path_rate: float = Field(
        0.0, ge=0, lt=1, description="eva_clip: stochastic depth in training, linear over the blocks (GRAM: 0.4)"
    )
    augment: Literal["none", "crop_flip"] = Field(
        "none",
        description="training-time augmentation on the device: crop_flip = GRAM's RandomResizedCrop (area 0.8-1) "
        "plus a horizontal flip, one per clip",
    )
    # CLIP's pixel statistics; frames arrive as uint8.
    pixel_mean: tuple[float, float, float] = Field(
        (0.48145466, 0.4578275, 0.40821073), description="per-channel mean the frames are normalised with (CLIP's)"
    )
    pixel_std: tuple[float, float, float] = Field(
        (0.26862954, 0.26130258, 0.27577711), description="per-channel std the frames are normalised with (CLIP's)"
    )


class ModelConfig(_ConfigBase):
    modalities: list[str] = Field(
        ["text", "video", "audio"], description=f"text and one or more of {', '.join(MODALITY_NAMES[1:])}"
    )
    text: EncoderConfig = EncoderConfig(pretrained="bert-base-uncased", pooling="cls")
    vision: VisionEncoderConfig = VisionEncoderConfig(pretrained="openai/clip-vit-base-patch16", pooling="cls")
    audio: EncoderConfig = EncoderConfig(pretrained="MIT/ast-finetuned-audioset-10-10-0.4593", pooling="cls")
    tokenizer: str | None = Field(
        None,
        description="Hugging Face tokenizer name/path; default: text.pretrained, or a word vocabulary built "
        "from the training captions when the text encoder has random weights",
    )
    max_text_length: int = Field(
        40, ge=4, description="caption tokens (GRAM: 40; 70 for DiDeMo/ActivityNet paragraphs)"
    )
    max_subtitle_length: int = Field(70, ge=4, description="subtitle tokens, when subtitles are a modality (GRAM: 70)")
    embed_dim: int = Field(512, ge=8, description="the shared embedding space's width: every projection head's output")
    head_bias: bool = Field(False, description="a bias in each projection head (GRAM's Contra_head: none)")
    itm_ratio: float = Field(
        0.0,
        ge=0,
        description="weight of GRAM's matching loss (DAM: volume-sampled hard negatives through the fusion; GRAM: "
        "0.1); > 0 needs text.cross_attention",
    )
    init_from: str | None = Field(
        None,
        description="a gram-ray checkpoint (folder or URI) every weight starts from, e.g. GRAM's released model "
        "after `gram-ray import-checkpoint`; pretrained encoders are then not read from their own files",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute the encoders' activations in the backward pass: far less memory, ~1/3 more compute",
    )
    temperature: float = Field(0.07, gt=0, description="the contrastive loss's temperature (its start, when learnable)")
    learnable_temperature: bool = Field(True, description="train the temperature with the model (GRAM: yes)")
    temperature_bounds: tuple[float, float] | None = Field(
        None, description="[min, max] the learnable temperature is clamped to; default: unclamped"
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="the InfoNCE targets' label smoothing (GRAM: 0.1)")
    gather: Literal["exact", "local", "seed", "none"] = Field(
        "exact",
        description="how features cross workers in the volume loss: exact (all_gather with gradient: DDP equals the "
        "full batch), local (other ranks' rows without gradient), seed (GRAM's code: every gathered row detached, "
        "own rows included: one-sided gradients, for reproducing GRAM), none",
    )
    compile: bool = Field(False, description="torch.compile the encoders and the volume (static-shape refinement)")
    refine_per_row: int | None = Field(
        None,
        ge=1,
        description="pairs per row the volume recomputes in float64 (static shapes, no host sync); default: every "
        "flagged pair eagerly, 2 per row when compiled",
    )

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in MODALITY_NAMES]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; known: {list(MODALITY_NAMES)}")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_and_another_each_once(cls, value: list[str]) -> list[str]:
        if "text" not in value or len(value) < 2 or len(set(value)) != len(value):
            raise ValueError(f"need 'text' and at least one other modality, each once; got {value}")
        return value

    @model_validator(mode="after")
    def _encoder_kinds(self) -> ModelConfig:
        allowed = {"text": ("hf",), "vision": ("hf", "eva_clip"), "audio": ("hf", "beats")}
        for tower, kinds in allowed.items():
            kind = getattr(self, tower).kind
            if kind not in kinds:
                raise ValueError(f"model.{tower}.kind={kind!r}: the {tower} encoder can be one of {list(kinds)}")
        return self

    @model_validator(mode="after")
    def _cross_attention_only_in_text(self) -> ModelConfig:
        for tower in ("vision", "audio"):
            if getattr(self, tower).cross_attention:
                raise ValueError(f"model.{tower}.cross_attention: only the text encoder has cross-attention layers")
        return self

    @model_validator(mode="after")
    def _match_head_fuses_through_cross_attention(self) -> ModelConfig:
        if self.itm_ratio > 0 and not self.text.cross_attention:
            raise ValueError(
                "model.itm_ratio > 0 trains the match head through the fusion: set model.text.cross_attention: true"
            )
        return self

    @model_validator(mode="after")
    def _match_head_has_a_clip_to_fuse(self) -> ModelConfig:
        if self.itm_ratio > 0 and not {"video", "audio"} & set(self.modalities):
            raise ValueError("model.itm_ratio > 0 needs video or audio to fuse with the captions")
        return self


class TrainConfig(_ConfigBase):
    epochs: float = Field(
        5, gt=0, description="may be fractional (GRAM's VATEX: 2.5): the run stops at round(epochs x steps an epoch)"
    )
    batch_size: int = Field(32, ge=2, description="per worker")
    global_batch_size: int | None = Field(
        None, ge=2, description="the batch over all workers, as GRAM's configs state it: sets batch_size per worker"
    )
    lr: float = Field(1e-4, gt=0, description="new layers: projections, temperature, randomly initialised encoders")
    encoder_lr: float = Field(2e-5, gt=0, description="pretrained encoders")
    vision_lr: float | None = Field(
        None,
        gt=0,
        description="a pretrained vision encoder's own lr (GRAM fine-tuning: clip_lr 5e-7); default encoder_lr",
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW's, on weight matrices only (none on biases and norms)")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW's betas (GRAM: 0.9, 0.98)")
    eps: float = Field(1e-6, gt=0, description="AdamW's eps (GRAM: 1e-6)")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps; when set, wins over warmup_ratio")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="warmup as a share of the run's steps (GRAM: 0.1)")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="decay after warmup, to 0")
    shuffle: Literal["blocks", "full", "none"] = Field(
        "blocks",
        description="new order every epoch, from train.seed and the epoch: blocks = Ray Data block order "
        "randomised plus a local shuffle buffer on each worker (cheap); full = Ray Data random_shuffle of every "
        "row (moves the whole split through the object store every epoch)",
    )
    shuffle_buffer: int = Field(256, ge=1, description="rows in each worker's local shuffle buffer (shuffle: blocks)")
    grad_clip: float = Field(2.0, gt=0, description="the gradients' global norm is clipped to this (GRAM: 2.0)")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated into one optimizer step")
    max_skipped_steps: int = Field(
        10,
        ge=1,
        description="a step whose loss or gradient norm is not finite skips its update (on every rank); this many "
        "in a row stop the run, naming the step and the last checkpoint",
    )
    bf16: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    fp16: bool = Field(
        False, description="fp16 autocast with a gradient scaler on GPU instead of bf16 (GPUs without bf16; GRAM's)"
    )
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="best K kept by val R@1")
    checkpoint_in_background: bool = Field(
        True,
        description="a checkpoint pauses training only while rank 0 copies the state to host memory; it is written "
        "and uploaded in the background, one at a time, and registered once whole (false: training waits for the "
        "write and the upload, and no host copy is made: for hosts without the memory for one)",
    )
    watchdog_steps: int = Field(
        10,
        ge=0,
        description="a rank with no step finished in max(N x the median step, train.watchdog_floor_s), outside "
        "evaluations and checkpoints, dumps its Python stacks into the run's stacks/ folder and ends, so the group "
        "restarts from the last checkpoint (a wait for data holds as long as storage's retries may; 0: off)",
    )
    watchdog_floor_s: float = Field(60.0, gt=0, description="the step watchdog's shortest limit, in seconds")
    preemption_checkpoint: bool = Field(
        True,
        description="when a node of the run is drained with a deadline (a spot notice), train on while there is "
        "time, then checkpoint before it goes: the restart loses no step (false: the restart goes back to the "
        "last scheduled checkpoint)",
    )
    log_every_steps: int = Field(10, ge=1, description="step metrics to W&B and metrics.jsonl every N steps")
    eval_every_epochs: int = Field(1, ge=1, description="evaluate (and checkpoint) every N epochs and at the end")
    evals_per_run: int | None = Field(
        None,
        ge=1,
        description="evaluate (and checkpoint) this many times, evenly over the run's steps, the last at its end "
        "(GRAM: valid_freq 10); wins over eval_every_epochs",
    )
    first_eval: bool = Field(False, description="also evaluate before the first step (GRAM's first_eval)")
    eval_batch_size: int = Field(64, ge=1, description="clips a batch when embedding the val split")
    prefetch_batches: int = Field(2, ge=0, description="batches Ray Data prepares ahead of each worker's step")
    seed: int = Field(0, description="seeds the model's initialisation, each epoch's order and caption draws")
    threads_per_worker: int | None = Field(None, ge=1, description="torch CPU threads per worker")
    time_steps: bool = Field(
        False,
        description="time each step's phases (data wait, forward, backward, optimizer; a device sync after each, "
        "so a little slower) and report them as time/* at every epoch end: for benchmarks and profiling",
    )
    time_warmup_steps: int = Field(
        2, ge=0, description="time_steps: the first steps left out of time/* (compilation, allocator, pipeline start)"
    )


class ScalingConfig(_ConfigBase):
    num_workers: int | tuple[int, int] = Field(
        2,
        description="trainer workers; [min, max]: elastic, Ray Train runs any size in that range (fewer after a lost "
        "node, without waiting for a replacement; more when nodes come back), each step keeping the same global "
        "batch through gradient accumulation",
    )
    use_gpu: bool = Field(False, description="one GPU per trainer worker")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole model, its gradients and AdamW state; fsdp: FSDP2 shards "
        "them over the workers, one unit per transformer block, bf16 compute on GPU from fp32 master weights "
        "(GRAM's 1.24 B parameters: ~23 GB a GPU under DDP, a quarter of it over 4 workers)",
    )
    fsdp_sync: Literal["every_micro_batch", "last_micro_batch"] = Field(
        "every_micro_batch",
        description="fsdp with gradient accumulation: reduce-scatter each micro-batch's gradients (least memory), "
        "or keep gradients and gathered weights on every worker until the step's last micro-batch (one "
        "reduce-scatter a step, no re-gathering; a full fp32 gradient and bf16 weights a worker more)",
    )
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray resources of each trainer worker, e.g. {CPU: 8, GPU: 1}; default Ray Train's"
    )
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1: forever")
    resize_check_s: float = Field(
        60.0,
        gt=0,
        description="elastic: how often a running group checks whether more workers fit now (a grow restarts the "
        "group from the last checkpoint); Ray Train's elastic_resize_monitor_interval_s",
    )
    start_timeout_s: float | None = Field(
        None,
        gt=0,
        description="how long a worker group's resources may take to be granted before Ray Train gives up that "
        "start and decides again (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S); default Ray's 60 s, and 5 s for elastic "
        "runs, which only start on resources that are there: after a node is lost without warning Ray's view of "
        "the cluster lags, and a start at the old size waits this long before the group goes on with fewer",
    )

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("needs at least 1 worker, and [min, max] with min <= max")
        return value

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @model_validator(mode="after")
    def _elastic_restarts(self) -> ScalingConfig:
        if self.elastic and self.max_failures == 0:
            raise ValueError(
                f"scaling.num_workers={list(self.num_workers)} goes on with fewer workers after a node is lost by "
                "restarting the worker group, which Ray Train counts as a failure: set scaling.max_failures to "
                "allow it (e.g. 5, or -1 for no limit)"
            )
        return self


class RunConfig(_ConfigBase):
    name: str = Field("gram", description="the run's name: its folder under run.storage_path, W&B's run name")
    storage_path: str | None = Field(None, description="local path or s3:// / gs:// URI; default <output>/ray")


class StorageConfig(_ConfigBase):
    """How hard every process of a job tries storage before a fault ends it (gram_ray/storage/). Unset keys come
    from the environment as AWS tools read it (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE; GRAM_RAY_STORAGE_*), else the
    defaults, chosen so a training run rides out a storage outage of up to two minutes (docs/faults.md)."""

    max_attempts: int | None = Field(
        None, ge=1, description="tries of one request, the first included (AWS_MAX_ATTEMPTS; default 5)"
    )
    retry_mode: Literal["standard", "legacy", "adaptive"] | None = Field(
        None,
        description="the AWS SDK's backoff between tries (AWS_RETRY_MODE; default standard: random, doubling up to "
        "20 s; legacy: 25 ms doubling; adaptive reads as standard, pyarrow has no client-side rate limiting)",
    )
    connect_timeout_s: float | None = Field(None, gt=0, description="default 10")
    request_timeout_s: float | None = Field(
        None, gt=0, description="a response silent for this long is a failed try (default 60)"
    )
    outage_s: float | None = Field(
        None,
        ge=0,
        description="how long one read, write or upload keeps trying past max_attempts before the job ends with an "
        "error naming the object (default 120)",
    )

    def chosen(self) -> dict:
        """The keys this config sets (the others come from the environment, then the defaults: storage's
        StorageSettings.of)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class WandbConfig(_ConfigBase):
    enabled: bool = Field(True, description="record the run with W&B (metrics.jsonl is written either way)")
    project: str | None = Field(None, description="the W&B project; default: WANDB_PROJECT, else gram-ray")
    entity: str | None = Field(None, description="the W&B team or user; default: WANDB_ENTITY, else the account's own")
    group: str | None = Field(None, description="the W&B group the run is filed under")
    tags: list[str] = Field([], description="W&B tags of the run")
    mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="auto: online when an API key is configured, else offline into the run folder"
    )


class TuneConfig(_ConfigBase):
    """A sweep: dotted config keys -> a distribution ({"loguniform": [lo, hi]}, {"uniform": [lo, hi]},
    {"choice": [...]}, {"grid": [...]})."""

    search_space: dict[str, dict[Literal["loguniform", "uniform", "choice", "grid"], list]] = Field(
        {
            "train.lr": {"loguniform": [1e-4, 3e-3]},
            "model.temperature": {"loguniform": [0.01, 0.2]},
            "model.learnable_temperature": {"choice": [True, False]},
        },
        description="dotted config key -> its distribution: {loguniform: [lo, hi]}, {uniform: ...}, {choice: [...]}, "
        "{grid: [...]}",
    )
    metric: str | None = Field(None, description="default: val t2v R@1 by volume over every modality")
    mode: Literal["max", "min"] = Field("max", description="whether tune.metric is better high or low")
    num_samples: int = Field(
        8, ge=1, description="trials: samples of the search space (each grid point this many times)"
    )
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what the cluster's CPUs/GPUs fit")
    grace_period: int = Field(1, ge=1, description="ASHA: evaluations before a trial can be stopped")
    reduction_factor: float = Field(2, gt=1, description="ASHA: 1/reduction_factor of the trials go on at each rung")


class EvalConfig(_ConfigBase):
    protocol: Literal["all", "seed"] = Field(
        "all",
        description="which captions and videos evaluation scores: all = every caption of every video; seed = "
        "GRAM's code: each video's first caption, and only videos with audio, comparable with the paper's tables",
    )
    rerank_k: int = Field(
        50,
        ge=0,
        description="evaluation: rescore each caption's (and each clip's) top k by volume with the match head, "
        "reported as the 'rerank' kind (GRAM: 50); 0 turns it off; needs a model with the matching loss",
    )
    rerank_score: Literal["match", "match_plus_volume"] = Field(
        "match_plus_volume",
        description="the score `search --rerank` gives the top k (evaluation reports both: kinds 'rerank' and "
        "'rerank_plus_volume'): match = GRAM's, the match head's probability alone; match_plus_volume = BLIP's "
        "form, the head's log-odds plus -volume / the model's temperature (retrieval/rerank.py)",
    )


# What scaling.strategy: fsdp is not combined with: (section, key) -> why, and what to do.
FSDP_EXCLUDES = {
    ("train", "fp16"): "scaling.strategy: fsdp computes in bf16 on GPU (train.bf16); train.fp16's loss scaler does "
    "not handle sharded gradients here: use train.bf16 (Ampere and later GPUs), or scaling.strategy: ddp",
    ("model", "compile"): "model.compile with scaling.strategy: fsdp has not been tested together (the encoders "
    "would be compiled before they are sharded): turn one of them off",
}


class GramConfig(_ConfigBase):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()
    wandb: WandbConfig = WandbConfig()
    tune: TuneConfig = TuneConfig()

    @property
    def worker_batch(self) -> int:
        """The clips a worker trains on per micro-batch at the full size: train.global_batch_size over the workers
        (scaling.num_workers, or its max) when it is set, else train.batch_size."""
        g = self.train.global_batch_size
        return g // self.scaling.max_workers if g is not None else self.train.batch_size

    @property
    def step_clips(self) -> int:
        """The clips of one optimizer step: the batch at its full size (scaling.num_workers, or its max)."""
        return self.worker_batch * self.scaling.max_workers * self.train.grad_accum

    @model_validator(mode="after")
    def _global_batch_divides_over_the_workers(self) -> GramConfig:
        g, workers = self.train.global_batch_size, self.scaling.max_workers
        if g is not None and g % workers:
            raise ValueError(
                f"train.global_batch_size={g} does not divide over scaling.num_workers={workers}: choose a "
                "multiple of the worker count"
            )
        return self

    @model_validator(mode="after")
    def _every_modality_has_a_decoder(self) -> GramConfig:
        for modality, section in (("video", self.data.video), ("audio", self.data.audio)):
            if modality in self.model.modalities and section.format == "none":
                raise ValueError(
                    f"model.modalities has {modality} but data.{modality}.format is none (nothing to decode it "
                    f"from): drop {modality} from model.modalities, or set data.{modality}.format"
                )
        return self

    @model_validator(mode="after")
    def _fsdp_alone(self) -> GramConfig:
        """What scaling.strategy: fsdp is not combined with (FSDP_EXCLUDES)."""
        if self.scaling.strategy == "fsdp":
            for (section, key), why in FSDP_EXCLUDES.items():
                if getattr(getattr(self, section), key):
                    raise ValueError(why)
        return self

    @model_validator(mode="after")
    def _elastic_range_keeps_the_step(self) -> GramConfig:
        s = self.scaling
        if not s.elastic:
            return self
        step = self.step_clips
        try:
            plans_for_range(step, self.worker_batch, s.min_workers, s.max_workers)
        except WorldSizeError as e:
            raise ValueError(
                f"scaling.num_workers={list(s.num_workers)} cannot keep the global batch of {step} clips a step "
                f"(train.batch_size {self.worker_batch} x {s.max_workers} workers x train.grad_accum "
                f"{self.train.grad_accum}) at every size in the range: {e}. Every size from min to max must divide "
                "the step: e.g. [1, 2] with an even step, [2, 4] with a step divisible by 12"
            ) from None
        return self

"""Cache rows (a numpy batch) -> a model batch: captions tokenised, tensors over the decoded media.

Training draws one caption per clip. The draw is a function of (seed, epoch, clip id) alone, not of a random
stream, so it does not depend on batch order or on which worker the clip landed on: a run resumed in the middle
of an epoch draws the same captions as one that was never interrupted. Evaluation keeps every caption, with
text_to_video mapping each caption to its clip.
"""

from __future__ import annotations

import copy
import threading
import zlib

import numpy as np
import torch

from gram_ray.config import GramConfig
from gram_ray.data.epoch_progress import FILE, EpochProgress
from gram_ray.data.fbank_codec import decode_fbank
from gram_ray.data.frame_codec import decode_jpegs, frames_of_draw
from gram_ray.data.schema import (
    AUDIO_FBANK_RANGE,
    AUDIO_FBANK_U8,
    CAPTIONS,
    FILES,
    FRAMES_JPEG,
    HAS_AUDIO,
    ID,
    IDS,
    MODALITIES,
    TEXT_TO_VIDEO,
)
from gram_ray.data.text import make_tokenizer, tokenize

__all__ = ["Collate", "caption_index", "epoch_order", "epoch_batches"]

_TOKENIZER_LOCK = threading.Lock()


def caption_index(seed: int, epoch: int, clip_id: str, num_captions: int, stream: int = 0) -> int:
    """Which caption of a clip training uses in an epoch (stream 1: which of its cached frame draws)."""
    if num_captions == 1:
        return 0
    key = [seed, epoch, zlib.crc32(clip_id.encode())] + ([stream] if stream else [])
    return int(np.random.default_rng(key).integers(num_captions))


def _writable_tensor(values) -> torch.Tensor:
    """A tensor over a batch column; copied only when the array is a read-only zero-copy view of the Arrow cache
    (torch cannot promise not to write into it)."""
    array = np.asarray(values)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _strings(value) -> list[str]:
    return [str(c) for c in (value.tolist() if isinstance(value, np.ndarray) else value)]


class Collate:
    """collate(numpy batch) -> model batch. Picklable (Ray ships it to workers): the tokenizer is built on
    first use, in the process that collates."""

    def __init__(self, cfg: GramConfig, vocab: list[str] | None, train: bool, epoch: int = 0) -> None:
        self.cfg, self.vocab, self.train, self.epoch = cfg, vocab, train, epoch
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        # Ray Data may collate on several threads at once, and transformers' lazy imports are not thread-safe.
        with _TOKENIZER_LOCK:
            if self._tokenizer is None:
                m = self.cfg.model
                self._tokenizer = make_tokenizer(m.tokenizer or m.text.pretrained, self.vocab)
        return self._tokenizer

    def for_epoch(self, epoch: int) -> Collate:
        other = copy.copy(self)
        other.epoch = epoch
        return other

    def __call__(self, batch: dict) -> dict:
        modalities = self.cfg.model.modalities
        # No audio: cannot take part in an audio volume; GRAM's protocol ("seed") also leaves such clips out of
        # every evaluation, so its numbers compare with the paper's tables.
        seed_protocol = not self.train and self.cfg.eval.protocol == "seed"
        drop_silent = "audio" in modalities or seed_protocol
        if drop_silent and HAS_AUDIO in batch and not np.all(batch[HAS_AUDIO]):
            keep = np.asarray(batch[HAS_AUDIO], dtype=bool)
            batch = {k: v[keep] for k, v in batch.items()}
        ids = [str(i) for i in batch[ID]]
        per_clip = [_strings(c) for c in batch[CAPTIONS]]
        if self.train:
            seed = self.cfg.train.seed
            texts = [caps[caption_index(seed, self.epoch, i, len(caps))] for i, caps in zip(ids, per_clip, strict=True)]
            text_to_video = np.arange(len(per_clip))
        else:
            if seed_protocol:  # GRAM's evaluation: each video's first caption only
                per_clip = [caps[:1] for caps in per_clip]
            texts = [c for caps in per_clip for c in caps]
            text_to_video = np.repeat(np.arange(len(per_clip)), [len(c) for c in per_clip])
        max_length = self.cfg.model.max_text_length
        text = MODALITIES["text"]
        tokens = tokenize(self.tokenizer, texts, max_length)
        out = {key: tokens[t] for key, t in zip(text.batch_keys, ("input_ids", "attention_mask"), strict=True)}
        out[TEXT_TO_VIDEO] = torch.from_numpy(text_to_video)
        if "video" in modalities:
            out |= self.frames(batch, ids)
        if "audio" in modalities:
            m = MODALITIES["audio"]
            if AUDIO_FBANK_U8 in batch:  # a uint8 cache (data.audio.cache_codec): back to float32
                out[m.batch_keys[0]] = torch.from_numpy(decode_fbank(batch[AUDIO_FBANK_U8], batch[AUDIO_FBANK_RANGE]))
            else:
                out[m.batch_keys[0]] = _writable_tensor(batch[m.cache_column]).float()
        if "subtitle" in modalities:
            m = MODALITIES["subtitle"]
            subs = tokenize(self.tokenizer, _strings(batch[m.cache_column]), self.cfg.model.max_subtitle_length)
            out[m.batch_keys[0]], out[m.batch_keys[1]] = subs["input_ids"], subs["attention_mask"]
        out[IDS] = ids
        out[FILES] = _strings(batch[FILE]) if FILE in batch else [""] * len(ids)  # for the epoch's progress
        return out

    def frames(self, batch: dict, ids: list[str]) -> dict:
        """The batch's video entry: this epoch's draw of each clip's frames, uint8 [B, N, 3, S, S] (they stay
        uint8 until the encoder), or JPEG left for the device to decode (decode_device: cuda)."""
        if FRAMES_JPEG in batch:
            return self._jpeg_frames(batch[FRAMES_JPEG], ids)
        m = MODALITIES["video"]
        values = batch[m.cache_column]
        if np.ndim(values) == 6:  # [B, draws, N, 3, S, S]: this epoch's draw per clip
            draws = np.shape(values)[1]
            pick = [caption_index(self.cfg.train.seed, self.epoch, i, draws, 1) if self.train else 0 for i in ids]
            values = np.asarray(values)[np.arange(len(ids)), pick]
        return {m.batch_keys[0]: _writable_tensor(values)}

    def _jpeg_frames(self, column, ids: list[str]) -> dict:
        """A JPEG cache's frames: this epoch's draw of each clip (training; the one draw of an eval cache),
        decoded here into uint8 [B, N, 3, S, S] (decode_device: cpu), or left as JPEG for the training loop to
        decode on its GPU in one call (decode_device: cuda)."""
        clips = [list(c) for c in column]
        v = self.cfg.data.video
        # A training cache holds draws x num_frames a clip; an eval cache one draw of eval_num_frames (all of it).
        if self.train or (v.train_draws > 1 and all(len(c) == v.train_draws * v.num_frames for c in clips)):
            n, seed = v.num_frames, self.cfg.train.seed
            draws = [max(1, len(c) // n) for c in clips]
            picks = [
                caption_index(seed, self.epoch, i, d, 1) if self.train else 0 for i, d in zip(ids, draws, strict=True)
            ]
            clips = [frames_of_draw(c, n, p) for c, p in zip(clips, picks, strict=True)]
        if self.cfg.data.video.decode_device == "cuda":
            return {FRAMES_JPEG: clips}
        return {MODALITIES["video"].batch_keys[0]: decode_jpegs(clips)}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of n rows that depends on (seed, epoch) alone: the order of an epoch over in-memory rows."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batches(rows: dict, batch_size: int, collate: Collate, epoch: int, skip: EpochProgress | None = None):
    """One epoch of model batches over rows held in memory (a numpy batch of cache rows), without Ray: shuffled
    by (train.seed, epoch), the clips `skip` holds (a resumed epoch's progress) left out, the last partial batch
    dropped."""
    ids = [str(i) for i in rows[ID]]
    order = epoch_order(len(ids), collate.cfg.train.seed, epoch)
    collate = collate.for_epoch(epoch)
    if skip:
        files = _strings(rows[FILE]) if FILE in rows else [""] * len(ids)
        order = order[~np.asarray(skip.contains([files[i] for i in order], [ids[i] for i in order]), dtype=bool)]
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chosen = order[start : start + batch_size]
        yield collate({k: v[chosen] for k, v in rows.items()})

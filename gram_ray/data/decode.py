"""One clip's media -> the cache's columns, whatever shape the data came in.

Every source (GRAM's annotations and media folders, a manifest, WebDataset shards, video2dataset's Parquet) gives
ClipInputs: an id, captions, and the video and audio as a path, a storage URI or bytes already read, with an
optional span. decode_clip turns one into frames and a filterbank; ClipColumns gathers the decoded clips of a
batch or a shard into the columns of data/schema.py. So the same clip gives the same cache row from any source.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gram_ray.config import DataConfig
from gram_ray.data.audio import decode_audio
from gram_ray.data.errors import DecodeError, Media, load_media
from gram_ray.data.fbank_codec import encode_fbank
from gram_ray.data.frame_codec import encode_frames
from gram_ray.data.image import decode_image
from gram_ray.data.schema import AUDIO_FBANK_RANGE, AUDIO_FBANK_U8, FRAMES_JPEG, object_column
from gram_ray.data.span import Span
from gram_ray.data.video import Mode, decode_video

__all__ = ["ClipInput", "ClipColumns", "clip_rng", "decode_clip", "columns_to_arrow", "frame_draws"]


@dataclass
class ClipInput:
    """One clip to decode. video/audio: a local path, a storage URI, or the bytes of a file or tar member; audio
    None takes the video's own track. error: why the clip cannot be used, known before decoding (a manifest row
    without a video, a failed download): it is skipped with that reason. absent: that reason is an absence the
    data itself records (a download that failed), counted apart from the failures."""

    id: str
    captions: list[str]
    subtitle: str = ""
    video: Media | None = None
    audio: Media | None = None
    span: Span | None = None
    error: str | None = None
    absent: bool = False


def clip_rng(media_id: str) -> np.random.Generator:
    """The random frame draws of a clip in a cache: seeded by its id, so that a cache decoded in pieces (a resumed
    run), or from another shape of the same data, holds the same bytes as one decoded in one go."""
    return np.random.default_rng(zlib.crc32(str(media_id).encode()))


def frame_draws(video, mode: Mode) -> int:
    """Draws of a clip's frames a cache of this mode holds (data.video.train_draws in a training cache)."""
    return video.train_draws if mode == "train" else 1


def _draw_shape(data: DataConfig, mode: Mode) -> tuple[int, ...]:
    draws = frame_draws(data.video, mode)
    return (draws,) if draws > 1 else ()


def _decode_frames(clip: ClipInput, data: DataConfig, mode: Mode, rng) -> tuple[np.ndarray, Media | None]:
    """(frames, the video as read: a path or its bytes, so that its audio track is not read twice) of a video or an
    image (data.video.format). Training caches keep train_draws independent draws (a random frame per segment
    each), so that epochs see different frames without decoding again; Collate picks one per clip per epoch. An
    image's draws are all the same still."""
    video = data.video
    media = load_media(clip.video, video.format)
    draws = frame_draws(video, mode)
    if video.format == "image":
        still = decode_image(media, video.num_frames, video.size)
        return (np.stack([still] * draws) if draws > 1 else still), None  # an image has no audio track
    frames = [
        decode_video(media, video.num_frames, video.size, mode, rng, decoder=video.decoder, span=clip.span)
        for _ in range(draws)
    ]
    return (np.stack(frames) if draws > 1 else frames[0]), media


def decode_clip(clip: ClipInput, data: DataConfig, mode: Mode, rng=None) -> dict:
    """{"frames"?, "audio_fbank"?, "has_audio"?} of one clip: frames left out with data.video.format none, audio
    with data.audio.format none. Raises DecodeError with the reason when the clip cannot be used. Audio: the
    separate file or member first, else the video's own track, else data.audio.missing (skip: the clip is not
    used; silence: kept, flagged has_audio=false)."""
    with_frames, with_audio = data.video.format != "none", data.audio.format != "none"
    out, track = {}, None
    if with_frames:
        out["frames"], track = _decode_frames(clip, data, mode, rng)
    if with_audio:
        try:
            out["audio_fbank"] = decode_audio(clip.audio, track, data.audio, mode, rng, span=clip.span)
            out["has_audio"] = True
        except DecodeError as e:
            if data.audio.missing == "skip" or not with_frames:  # an audio-only clip without audio is nothing
                hint = " (data.audio.missing=silence keeps such clips)" if with_frames else ""
                # Left out by the user's policy when its audio is absent; a track that cannot be read is a failure.
                raise DecodeError(f"{e}{hint}", absent=e.absent and with_frames) from None
            a = data.audio
            out["audio_fbank"] = np.zeros((a.windows, a.window_frames, a.mel_bins), np.float32)  # never used
            out["has_audio"] = False
    return out


class ClipColumns:
    """The decoded clips of a batch or a shard, gathered into cache columns (and the clips that failed)."""

    def __init__(self, data: DataConfig, mode: Mode, decoder=None) -> None:
        self.data, self.mode = data, mode
        self.decoder = decoder or decode_clip  # decode_clip; `gram-ray bench scale` passes a stand-in
        self.rows: dict[str, list] = {"id": [], "captions": [], "frames": [], "audio_fbank": [], "has_audio": []}
        self.rows["subtitle"] = []
        self.failures: list[dict] = []

    def __len__(self) -> int:
        return len(self.rows["id"])

    def decode(self, clip: ClipInput, rng=None) -> None:
        """Decode one clip and keep it, or record why it cannot be used."""
        if clip.error:
            self.fail(clip.id, clip.error, expected=clip.absent)
            return
        try:
            decoded = self.decoder(clip, self.data, self.mode, rng)
        except DecodeError as e:
            self.fail(clip.id, str(e), expected=e.absent)
            return
        for key, value in decoded.items():
            self.rows[key].append(value)
        self.rows["id"].append(str(clip.id))
        self.rows["captions"].append([str(c) for c in clip.captions])
        self.rows["subtitle"].append(str(clip.subtitle or ""))

    def fail(self, clip_id: str, reason: str, expected: bool = False) -> None:
        """Record a clip left out and why; expected: an absence the data or the user's settings foretell (a failed
        download, no audio under data.audio.missing=skip), not a failure to decode."""
        self.failures.append({"id": str(clip_id), "reason": reason} | ({"expected": True} if expected else {}))

    def columns(self) -> dict:
        """numpy columns of the clips kept (empty, with the right shapes, when none were)."""
        data, mode, rows = self.data, self.mode, self.rows
        video, audio = data.video, data.audio
        columns = {"id": np.array(rows["id"], dtype=object), "captions": object_column(rows["captions"])}
        if video.format != "none":
            columns["frames"] = (
                np.stack(rows["frames"])
                if rows["frames"]
                else np.zeros((0, *_draw_shape(data, mode), video.num_frames, 3, video.size, video.size), np.uint8)
            )
        if audio.format != "none":
            columns["audio_fbank"] = (
                np.stack(rows["audio_fbank"])
                if rows["audio_fbank"]
                else np.zeros((0, audio.windows, audio.window_frames, audio.mel_bins), np.float32)
            )
            columns["has_audio"] = np.array(rows["has_audio"], dtype=bool)
        columns["subtitle"] = np.array(rows["subtitle"], dtype=object)
        return columns

    def cache_columns(self, subtitles: bool) -> dict:
        """columns() as a cache stores them: frames as JPEGs with data.video.cache_codec jpeg, the filterbank as
        uint8 with data.audio.cache_codec uint8, no subtitle column when the data has none."""
        columns = self.columns()
        if not subtitles:
            columns.pop("subtitle")
        if self.data.video.cache_codec == "jpeg" and "frames" in columns:  # each frame of each draw, one JPEG
            frames = columns.pop("frames")
            columns[FRAMES_JPEG] = [encode_frames(clip, self.data.video.jpeg_quality) for clip in frames]
        if self.data.audio.cache_codec == "uint8" and "audio_fbank" in columns:
            columns[AUDIO_FBANK_U8], columns[AUDIO_FBANK_RANGE] = encode_fbank(columns.pop("audio_fbank"))
        return columns


def columns_to_arrow(columns: dict) -> pa.Table:
    """Decoded columns -> an Arrow table with tensor columns (Ray's tensor type), built here rather than by Ray
    Data: Ray converts a numpy batch of zero rows (every clip of a decode batch failed) through pyarrow's native
    path, which cannot hold an n-d array, and falls back to pickling the column ("Failed to convert column
    'frames' into pyarrow array ... falling back to pickled python objects"): slow and large in the object store,
    and a column type that differs from the other blocks'."""
    from ray.data.extensions import ArrowTensorArray

    table = {
        "id": pa.array(list(columns["id"]), pa.string()),
        "captions": pa.array([list(c) for c in columns["captions"]], pa.list_(pa.string())),
    }
    if FRAMES_JPEG in columns:
        table[FRAMES_JPEG] = pa.array(list(columns[FRAMES_JPEG]), pa.list_(pa.binary()))
    elif "frames" in columns:
        table["frames"] = ArrowTensorArray.from_numpy(columns["frames"])
    for name in ("audio_fbank", AUDIO_FBANK_U8, AUDIO_FBANK_RANGE):
        if name in columns:
            table[name] = ArrowTensorArray.from_numpy(columns[name])
    if "has_audio" in columns:
        table["has_audio"] = pa.array(columns["has_audio"], pa.bool_())
    if "subtitle" in columns:
        table["subtitle"] = pa.array(list(columns["subtitle"]), pa.string())
    return pa.table(table)

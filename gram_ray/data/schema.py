"""The data contract: what a cache row holds, what a model batch holds, and which encoder reads which modality.

Adding a modality is one entry in MODALITIES (plus its decoder and encoder, and its name in the config's
MODALITY_NAMES: a test checks they agree); every other module reads the column and key names from here.
Import-light on purpose (numpy only): the model, the loop and Ray Data UDFs all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ID",
    "CAPTIONS",
    "HAS_AUDIO",
    "FRAMES_JPEG",
    "AUDIO_FBANK_U8",
    "AUDIO_FBANK_RANGE",
    "TEXT_TO_VIDEO",
    "IDS",
    "FILES",
    "CACHE_COLUMNS",
    "Modality",
    "MODALITIES",
    "object_column",
]

# Cache columns that are not a modality's input.
ID = "id"  # str: the video id of the annotation file
CAPTIONS = "captions"  # list[str]: every caption of the clip (the text modality draws from these)
HAS_AUDIO = "has_audio"  # bool: false when the clip was kept without audible audio (data.audio.missing: silence)
# list[bytes]: a JPEG cache's frames instead of the video column (data.video.cache_codec: jpeg): one JPEG per
# frame, draws x N, draw-major; decoded by the input pipeline (data/frame_codec.py) into the same uint8 frames.
FRAMES_JPEG = "frames_jpeg"
# A uint8 cache's filterbank instead of the audio column (data.audio.cache_codec: uint8): uint8 [A, L, mel_bins],
# each window mapped from its [min, max] (float32 [A, 2] in AUDIO_FBANK_RANGE) onto 0..255; the input pipeline
# (data/fbank_codec.py) turns it back into the float32 filterbank.
AUDIO_FBANK_U8 = "audio_fbank_u8"
AUDIO_FBANK_RANGE = "audio_fbank_range"

# Model-batch keys that are not a modality's input.
TEXT_TO_VIDEO = "text_to_video"  # long [n_captions]: row of the caption's clip in the batch
IDS = "ids"  # list[str]: the clips of the batch, in row order
FILES = "files"  # list[str]: the cache file each clip was read from ("" where none), as IDS


@dataclass(frozen=True)
class Modality:
    """One modality: the cache column it is decoded into, the batch keys collate makes of it, and the encoder
    (a GramModel attribute) that embeds it."""

    name: str
    cache_column: str
    batch_keys: tuple[str, ...]
    encoder: str


MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality("text", CAPTIONS, ("input_ids", "attention_mask"), encoder="text"),
        Modality("video", "frames", ("frames",), encoder="vision"),  # uint8 [N, 3, S, S]
        Modality("audio", "audio_fbank", ("audio_fbank",), encoder="audio"),  # float32 [A, L, mel_bins]
        Modality("subtitle", "subtitle", ("subtitle_input_ids", "subtitle_attention_mask"), encoder="text"),
    )
}

# Every column a cache may hold; subtitle only when the annotations have subtitles.
CACHE_COLUMNS = (
    ID,
    CAPTIONS,
    MODALITIES["video"].cache_column,
    FRAMES_JPEG,
    MODALITIES["audio"].cache_column,
    AUDIO_FBANK_U8,
    AUDIO_FBANK_RANGE,
    HAS_AUDIO,
    MODALITIES["subtitle"].cache_column,
)


def object_column(items: list) -> np.ndarray:
    """A 1-D object array holding one Python object (e.g. a list of captions) per row; np.array alone would try
    to build a 2-D array from equal-length lists."""
    column = np.empty(len(items), dtype=object)
    column[:] = items
    return column

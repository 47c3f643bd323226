"""A learnable synthetic tri-modal dataset whose captions need the audio.

Each clip shows a moving shape (shape, colour, direction: visible) and plays a tone (pitch, rhythm: audible);
its caption names all five, e.g. "a red circle moves left while a low pulsing tone plays". The val split is
built from groups: one visual combination with every one of the 4 audio combinations. So every val caption
identifies exactly one val clip, and by text and video alone 4 clips fit each caption: retrieval over
text+video is capped near chance within a group (R@1 <= ~25%), while text+video+audio can be perfect. That is
the paper's T-V vs T-VA comparison, on data anyone can generate in seconds.

Files: <out>/videos/<id>.mp4 (H.264, written by PyAV), <out>/audios/<id>.wav (16 kHz mono PCM), and
annotations in the GRAM format: all.json, train.json, val.json, each entry with its `attributes` and `split`.
"""

from __future__ import annotations

import itertools
import json
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "SHAPES",
    "COLOURS",
    "DIRECTIONS",
    "PITCHES",
    "RHYTHMS",
    "caption",
    "generate",
    "dataset_paths",
    "write_wav",
]

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (235, 220, 40)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PITCHES = {"low": 220.0, "high": 880.0}
RHYTHMS = ("steady", "pulsing")
AUDIO_COMBOS = list(itertools.product(PITCHES, RHYTHMS))  # 4: the group size of the val split
VISUAL_COMBOS = list(itertools.product(SHAPES, COLOURS, DIRECTIONS))  # 48

SAMPLE_RATE = 16000


def caption(a: dict) -> str:
    return f"a {a['colour']} {a['shape']} moves {a['direction']} while a {a['pitch']} {a['rhythm']} tone plays"


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)  # triangle, apex up


def _frames(a: dict, size: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    # Large enough to stay recognisable when decoded down to 32 px, travelling across the whole frame.
    r = size * 0.2
    (vx, vy), lo, hi = DIRECTIONS[a["direction"]], r + 1, size - r - 1
    across = rng.uniform(lo, hi)  # a random offset across the motion
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    background = rng.integers(20, 60)
    for t in range(num_frames):
        along = lo + (hi - lo) * t / max(num_frames - 1, 1)
        if vx < 0 or vy < 0:
            along = size - along
        cx, cy = (along, across) if vx else (across, along)
        frame = np.full((size, size, 3), background, dtype=np.uint8)
        frame[_shape_mask(a["shape"], size, cx, cy, r)] = COLOURS[a["colour"]]
        frames[t] = frame
    return frames


def _tone(a: dict, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave_ = np.sin(2 * np.pi * PITCHES[a["pitch"]] * t + rng.uniform(0, 2 * np.pi))
    if a["rhythm"] == "pulsing":
        wave_ *= (np.sin(2 * np.pi * 4 * t) > 0).astype(np.float64)  # 4 beats a second
    return (0.5 * wave_ + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    import av  # imported here: reading generated data back (decord) needs no PyAV

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def _plan(n: int, val_share: float, rng: np.random.Generator) -> list[dict]:
    """Attributes and split of every clip: val in complete groups of 4 audio variants, train at random."""
    groups = min(len(VISUAL_COMBOS), max(1, round(n * val_share / len(AUDIO_COMBOS))))
    if groups * len(AUDIO_COMBOS) >= n:
        raise ValueError(
            f"n={n} is too small: the val split alone needs {groups * len(AUDIO_COMBOS)} clips; use n >= 16"
        )

    def clip(visual: tuple, audio: tuple, split: str) -> dict:
        return dict(zip(("shape", "colour", "direction", "pitch", "rhythm"), visual + audio, strict=True)) | {
            "split": split
        }

    plan = [
        clip(VISUAL_COMBOS[v], audio, "val")
        for v in rng.permutation(len(VISUAL_COMBOS))[:groups]
        for audio in AUDIO_COMBOS
    ]
    for _ in range(n - len(plan)):
        plan.append(
            clip(
                VISUAL_COMBOS[rng.integers(len(VISUAL_COMBOS))], AUDIO_COMBOS[rng.integers(len(AUDIO_COMBOS))], "train"
            )
        )
    return plan


def generate(
    out: str | Path,
    n: int = 200,
    seed: int = 0,
    size: int = 64,
    seconds: float = 2.0,
    fps: int = 8,
    val_share: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write n clips under out; returns {"train": path, "val": path, "all": path, "videos": dir, "audios": dir}."""
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "audios").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i, a in enumerate(_plan(n, val_share, rng)):
        clip_id = f"synth{i:05d}"
        _write_video(out / "videos" / f"{clip_id}.mp4", _frames(a, size, int(seconds * fps), rng), fps)
        write_wav(out / "audios" / f"{clip_id}.wav", _tone(a, seconds, rng))
        attributes = {k: a[k] for k in ("shape", "colour", "direction", "pitch", "rhythm")}
        entries.append({"video_id": clip_id, "desc": caption(a), "split": a["split"], "attributes": attributes})
        if progress:
            progress(i + 1, n)
    paths = dataset_paths(out)
    for split in ("train", "val", "all"):
        chosen = [e for e in entries if split == "all" or e["split"] == split]
        Path(paths[split]).write_text(json.dumps(chosen, indent=1))
    return paths


def dataset_paths(out: str | Path) -> dict:
    """Where generate(out) puts each part: {"train", "val", "all": annotation files, "videos", "audios": dirs}."""
    out = Path(out).resolve()
    return {"videos": str(out / "videos"), "audios": str(out / "audios")} | {
        split: str(out / f"{split}.json") for split in ("train", "val", "all")
    }

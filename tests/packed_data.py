"""Test data in the shapes users hold it: a long video to cut spans from, m4a audio, video2dataset-style tar shards
and Parquet files, manifests. Written with PyAV and the standard library only."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np


def write_long_video(path: Path, seconds: float = 12.0, fps: int = 10, gop: int = 20, audio: bool = True) -> None:
    """H.264 with B-frames and a keyframe every `gop` frames (so a span starts between keyframes), each frame a
    different picture (its index in a moving gradient), and an AAC track whose pitch rises with time."""
    import av

    n, (h, w) = int(seconds * fps), (48, 64)
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        video.options = {"crf": "18", "preset": "veryfast", "g": str(gop), "bf": "2"}
        track = None
        if audio:
            track = container.add_stream("aac", rate=16000)
            track.layout = "mono"
        for i in range(n):
            picture = np.stack([(xx * 3 + i * 7) % 256, (yy * 5 + i * 3) % 256, np.full_like(xx, (i * 11) % 256)], -1)
            container.mux(video.encode(av.VideoFrame.from_ndarray(picture.astype(np.uint8), format="rgb24")))
        container.mux(video.encode())
        if track is not None:
            t = np.arange(int(seconds * 16000)) / 16000
            samples = (0.5 * np.sin(2 * np.pi * (200 + 40 * t) * t)).astype(np.float32)
            for start in range(0, samples.size, 1024):
                frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="flt", layout="mono")
                frame.sample_rate = 16000
                frame.pts = start
                container.mux(track.encode(frame))
            container.mux(track.encode())


def wav_to_m4a(wav: Path, m4a: Path) -> None:
    """AAC in an MP4 container (what video2dataset writes for separate audio)."""
    import av

    with av.open(str(wav)) as src, av.open(str(m4a), "w", format="mp4") as dst:
        out = dst.add_stream("aac", rate=16000)
        out.layout = "mono"
        for frame in src.decode(audio=0):
            frame.pts = None
            for packet in out.encode(frame):
                dst.mux(packet)
        for packet in out.encode():
            dst.mux(packet)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def v2d_sample(key: str, video: bytes | None, captions: list[str], audio: bytes | None = None, **meta) -> list:
    """The members video2dataset writes for one sample: mp4 (absent when the download failed), txt, json (with
    MSR-VTT's recipe's caption_0..caption_N), m4a when audio was asked for separately."""
    record = {"key": key, "url": f"https://example.com/{key}", "caption": captions[0], "status": "success"} | {
        f"caption_{i}": c for i, c in enumerate(captions)
    }
    record |= meta
    members = []
    if video is not None:
        members.append((f"{key}.mp4", video))
    if audio is not None:
        members.append((f"{key}.m4a", audio))
    members += [(f"{key}.txt", captions[0].encode()), (f"{key}.json", json.dumps(record).encode())]
    return members

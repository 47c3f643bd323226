"""Hostile and odd media files, generated: the kinds a scraped dataset holds. hostile_media(folder) writes them
and returns {kind: (id, expectation)}; the tests check each is skipped with its reason or decodes correctly."""

import json
import os
from pathlib import Path

import numpy as np

from gram_ray.data.synthetic import write_wav

SAMPLE_RATE = 16000


def _frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Frames no decoder would produce by accident: a moving gradient with noise (never all zeros)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    out = []
    for t in range(n):
        base = (x * 255 // max(width - 1, 1) + t * 9) % 256
        frame = np.stack([base, (y * 255 // max(height - 1, 1)), np.full_like(base, 40 + 5 * t)], -1)
        out.append(np.clip(frame + rng.integers(-10, 10, frame.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def write_video(
    path: Path, frames: np.ndarray, codec: str = "libx264", pix_fmt: str = "yuv420p", audio: np.ndarray | None = None
) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        else:
            stream.bit_rate = 500_000  # libvpx refuses to open without one
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=SAMPLE_RATE)
            sound.layout = "mono"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
        if sound is not None:
            samples = audio.astype(np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            container.mux(sound.encode(frame))
            container.mux(sound.encode())


def write_audio_only(path: Path, samples: np.ndarray) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        sound = container.add_stream("aac", rate=SAMPLE_RATE)
        sound.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples.astype(np.float32).reshape(1, -1), format="fltp", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        container.mux(sound.encode(frame))
        container.mux(sound.encode())


def tone(seconds: float = 2.0, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


SKIP, DECODE = "skip", "decode"


def hostile_media(root: Path) -> dict[str, tuple[str, str, str]]:
    """Writes <root>/videos, <root>/audios and <root>/ann.json. Returns {id: (kind, expectation, reason part)}:
    expectation SKIP (the reason must contain the part) or DECODE (the part is unused)."""
    videos, audios = root / "videos", root / "audios"
    videos.mkdir(parents=True)
    audios.mkdir()
    good = videos / "good.mp4"
    write_video(good, _frames(16, 64, 64), audio=tone())
    data = good.read_bytes()
    cases: dict[str, tuple[str, str, str]] = {}

    def case(media_id: str, kind: str, expect: str, reason: str = "") -> None:
        cases[media_id] = (kind, expect, reason)

    case("good", "a plain H.264 clip with an AAC track", DECODE)
    (videos / "random.mp4").write_bytes(np.random.default_rng(1).bytes(20_000))
    case("random", "random bytes named .mp4", SKIP, "not a readable video")
    (videos / "empty.mp4").write_bytes(b"")
    case("empty", "a zero-byte file", SKIP, "is empty (0 bytes)")
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])
    case("truncated", "the first half of a clip", SKIP, "not a readable video")
    (videos / "header.mp4").write_bytes(data[:1024])
    case("header", "only the first 1 KB (the container header)", SKIP, "not a readable video")
    (videos / "text.mp4").write_text("this is not a video, it is a note someone saved as .mp4\n" * 20)
    case("text", "a text file named .mp4", SKIP, "not a readable video")
    write_audio_only(videos / "audioonly.mp4", tone())
    case("audioonly", "an audio-only MP4 container", SKIP, "no video stream")
    (videos / "folder.mp4").mkdir()
    case("folder", "a folder named like a video", SKIP, "is a folder")
    os.symlink(root / "nowhere.mp4", videos / "dangling.mp4")
    case("dangling", "a dangling symlink", SKIP, "dangling symlink")
    write_video(videos / "noaudio.mp4", _frames(16, 64, 64, seed=2))
    case("noaudio", "a video without an audio track (audio required)", SKIP, "no readable audio track")
    write_video(videos / "silent.mp4", _frames(16, 64, 64, seed=3), audio=np.zeros(2 * SAMPLE_RATE, np.float32))
    case("silent", "a video with a silent track (audio required)", SKIP, "audio is silent")
    write_video(videos / "garbageaudio.mp4", _frames(16, 64, 64, seed=4))
    (audios / "garbageaudio.wav").write_bytes(np.random.default_rng(2).bytes(5000))
    case("garbageaudio", "a separate audio file of random bytes", SKIP, "no readable audio track")
    write_video(videos / "cutaudio.mp4", _frames(16, 64, 64, seed=5))
    write_audio_only(audios / "cutaudio.m4a", tone(3.0))
    m4a = (audios / "cutaudio.m4a").read_bytes()
    (audios / "cutaudio.m4a").write_bytes(m4a[: len(m4a) // 3])
    case("cutaudio", "a separate audio file cut off", SKIP, "no readable audio track")
    middle = bytearray(data)
    start = len(middle) // 3
    middle[start : start + 2000] = np.random.default_rng(3).bytes(2000)
    (videos / "corrupt.mp4").write_bytes(bytes(middle))
    case("corrupt", "2 KB of garbage in the middle of a valid clip", SKIP, "cannot be decoded (truncated or corrupt?)")
    # Odd but valid: these must decode.
    write_video(videos / "vp9.webm", _frames(16, 64, 64, seed=6), codec="libvpx-vp9")
    case("vp9", "VP9 in WebM", DECODE)
    write_video(videos / "mjpeg.mkv", _frames(16, 64, 64, seed=7), codec="mjpeg", pix_fmt="yuvj420p")
    case("mjpeg", "MJPEG in Matroska", DECODE)
    write_video(videos / "yuv444.mp4", _frames(16, 64, 64, seed=8), pix_fmt="yuv444p")
    case("yuv444", "H.264 in yuv444p", DECODE)
    write_video(videos / "tiny.mp4", _frames(16, 16, 16, seed=9))
    case("tiny", "16 x 16 pixels", DECODE)
    write_video(videos / "strip.mp4", _frames(16, 32, 640, seed=10))
    case("strip", "a 640 x 32 strip", DECODE)
    write_video(videos / "short.mp4", _frames(3, 64, 64, seed=11))
    case("short", "3 frames, fewer than the 8 sampled", DECODE)
    write_video(videos / "mislabelled.mkv", _frames(16, 64, 64, seed=12))
    (videos / "mislabelled.mkv").rename(videos / "mislabelled.webm")  # an MP4 named .webm
    case("mislabelled", "an MP4 file named .webm", DECODE)
    write_video(videos / "unicode.mp4", _frames(16, 64, 64, seed=13))
    case("unicode", "a non-ASCII caption", DECODE)
    write_video(videos / "longcap.mp4", _frames(16, 64, 64, seed=14))
    case("longcap", "a 25,000-character caption", DECODE)
    for media_id in (
        "vp9",
        "mjpeg",
        "yuv444",
        "tiny",
        "strip",
        "short",
        "mislabelled",
        "unicode",
        "longcap",
        "noaudio",
    ):
        if media_id != "noaudio":
            write_wav(audios / f"{media_id}.wav", tone(2.0, 300 + 10 * len(media_id)))
    captions = {"unicode": "ein Hund bellt – 狗在叫 🐕 à côté", "longcap": "word " * 5000}
    annotations = [{"video_id": m, "desc": captions.get(m, f"clip {m}")} for m in cases]
    (root / "ann.json").write_text(json.dumps(annotations, ensure_ascii=False))
    return cases


def generate_in_subprocess(root: Path) -> dict[str, tuple[str, str, str]]:
    """hostile_media(root) in a fresh Python: PyAV's VP9 encoder fails to open once decord (which ships its own
    FFmpeg libraries) is loaded in the process, as it is in a test session."""
    import subprocess
    import sys

    subprocess.run([sys.executable, __file__, str(root)], check=True, capture_output=True, text=True)
    return {k: tuple(v) for k, v in json.loads((root / "cases.json").read_text()).items()}


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1])
    (out / "cases.json").write_text(json.dumps(hostile_media(out)))

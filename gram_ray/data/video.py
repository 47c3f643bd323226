"""Video clips -> uint8 frames [N, 3, S, S], decoding only what the sampled frames need.

N frames come from N equal segments of the clip: the middle frame of each in eval mode (deterministic), a
random frame of each in train mode (temporal augmentation). Short side resized to S, then centre-cropped.

Two decoders give the same frames:
- "pyav" (default): demux the packets, rank their timestamps to find the sampled frames, then decode in one
  forward pass that tells FFmpeg to skip every non-reference frame that is not sampled (AVDISCARD_NONREF, set
  per packet). No other frame depends on a non-reference frame, so the sampled frames are bit-identical to a
  full decode, and in typical H.264 (B-frames in 40-60% of frames) this is ~2x faster than decoding them all.
  Only the sampled frames are converted to RGB, by swscale straight to the target size.
- "decord": decord's VideoReader asked for frames whose short side is already S (its scaler resizes); it
  decodes every frame up to the last sampled one. It needs no PyAV: without PyAV installed (a slim GPU image,
  say) it reads the frame size from the first decoded frame instead of the container header.

A span (start, end seconds; data/span.py) samples the N segments of that span only: PyAV seeks to the keyframe
before it and demuxes up to its end, so a clip cut from a long video costs what the clip costs.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from decord import DECORDError, VideoReader, cpu

from gram_ray.data.errors import DecodeError, Media, load_media, reader_input
from gram_ray.data.errors import pyav_or_none as _pyav  # a name of its own here: tests take PyAV away
from gram_ray.data.span import Span, check_span, pts_seconds, stream_duration, to_pts

__all__ = ["segment_indices", "decode_video", "probe_size", "DECODERS"]

Mode = Literal["train", "eval"]
DECODERS = ("pyav", "decord")


def segment_indices(num_total: int, num_frames: int, mode: Mode, rng: np.random.Generator | None = None) -> np.ndarray:
    """One frame index per equal segment: the middle (eval) or a uniformly random one (train). A clip with fewer
    frames than asked has segments shorter than a frame: each takes the frame it falls in, so frames repeat in
    order (as GRAM's linspace sampling does) rather than the clip being lost."""
    if num_total < 1:
        raise DecodeError("video has no frames")
    if num_total < num_frames:
        positions = (np.arange(num_frames) + 0.5) * num_total / num_frames  # segment middles
        if mode == "train":
            rng = rng or np.random.default_rng()
            positions = (np.arange(num_frames) + rng.random(num_frames)) * num_total / num_frames
        return np.minimum(np.floor(positions).astype(int), num_total - 1)
    edges = np.linspace(0, num_total, num_frames + 1)
    starts, ends = np.floor(edges[:-1]).astype(int), np.maximum(np.floor(edges[1:]).astype(int), 1)
    ends = np.maximum(ends, starts + 1)
    if mode == "eval":
        return (starts + ends - 1) // 2
    rng = rng or np.random.default_rng()
    return rng.integers(starts, ends)


def _not_readable(e: Exception) -> DecodeError:
    return DecodeError(f"not a readable video ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def _undecodable(detail: object) -> DecodeError:
    return DecodeError(f"video cannot be decoded (truncated or corrupt?): {str(detail).splitlines()[0][:200]}")


# decord raises DECORDError for a bad file, RuntimeError for bad bytes in memory.
_DECORD_ERRORS = (DECORDError, RuntimeError)


def probe_size(media: Media) -> tuple[int, int]:
    """(width, height) from the container header, without decoding a frame (from the first frame, by decord,
    where PyAV is not installed). media: a local path or the clip's bytes."""
    av = _pyav()
    if av is None:
        try:
            height, width = VideoReader(reader_input(media), ctx=cpu(0), num_threads=1)[0].shape[:2]
        except (*_DECORD_ERRORS, IndexError) as e:  # IndexError: no frame at all
            raise _not_readable(e) from None
        return width, height
    try:
        with av.open(reader_input(media)) as container:
            if not container.streams.video:
                raise DecodeError("file has no video stream")
            stream = container.streams.video[0]
            return stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise _not_readable(e) from None


def _scaled(width: int, height: int, size: int) -> tuple[int, int]:
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def _crop(frames: np.ndarray, size: int) -> np.ndarray:
    """[N, H, W, 3] -> centre crop, channels first: [N, 3, size, size]."""
    top, left = (frames.shape[1] - size) // 2, (frames.shape[2] - size) // 2
    return np.ascontiguousarray(frames[:, top : top + size, left : left + size].transpose(0, 3, 1, 2))


def _span_packets(container, stream, span: Span) -> list:
    """The packets to decode for the frames of a span: from the keyframe before its start (a seek) to the last
    packet whose decode time is inside it (a frame shown inside the span is decoded before its end: dts <= pts)."""
    check_span(span, stream_duration(container, stream))
    container.seek(to_pts(stream, span[0]), stream=stream, backward=True, any_frame=False)
    end_pts = to_pts(stream, span[1])
    packets = []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if packet.dts is not None and packet.dts >= end_pts:
            break
        packets.append(packet)
    return packets


def _in_span(stream, pts: int, span: Span | None) -> bool:
    return span is None or span[0] <= float(pts_seconds(stream, pts)) < span[1]  # as a manifest writes times


def _decode_pyav(media: Media, num_frames: int, size: int, mode: Mode, rng, span: Span | None = None) -> np.ndarray:
    av = _pyav()
    if av is None:  # not a property of this file: stop the job with what to do
        raise RuntimeError("data.video.decoder=pyav needs PyAV (pip install av); or set data.video.decoder=decord")
    try:
        container = av.open(reader_input(media))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise _not_readable(e) from None
    try:
        with container:
            if not container.streams.video:
                raise DecodeError("file has no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context
            codec.thread_count = 1  # one Ray Data task per CPU: threads would only contend
            if span is None:
                packets = [p for p in container.demux(stream) if p.size > 0]
                listed = stream.frames  # the container's index (0 where it has none, e.g. WebM)
                if listed and len(packets) < listed - 2:  # a little slack for edit lists and empty packets
                    raise DecodeError(
                        f"video is truncated: its index lists {listed} frames but only {len(packets)} are in the file"
                    )
            else:
                packets = _span_packets(container, stream, span)
            if any(p.pts is None for p in packets):
                return _decode_decord(media, num_frames, size, mode, rng, span)  # no timestamps to find frames by
            timeline = sorted(p.pts for p in packets if _in_span(stream, p.pts, span))  # presentation order
            if not timeline:
                raise DecodeError(f"span {span[0]:g}-{span[1]:g} s holds no frame of the video")
            wanted = [timeline[i] for i in segment_indices(len(timeline), num_frames, mode, rng)]
            targets = set(wanted)
            width, height = _scaled(codec.width, codec.height, size)
            got: dict[int, np.ndarray] = {}

            def keep(frames) -> None:
                for f in frames:
                    if f.pts in targets and f.pts not in got:
                        got[f.pts] = f.to_ndarray(width=width, height=height, format="rgb24", interpolation="BILINEAR")

            for packet in packets:
                codec.skip_frame = "DEFAULT" if packet.pts in targets else "NONREF"
                keep(codec.decode(packet))
                if len(got) == len(targets):
                    break
            else:
                codec.skip_frame = "DEFAULT"
                keep(codec.decode(None))  # flush the frames still held back for reordering
    except av.FFmpegError as e:
        raise _undecodable(e) from None
    if len(got) < len(targets):
        raise _undecodable(f"only {len(got)} of the {len(targets)} sampled frames came out of the decoder")
    return _crop(np.stack([got[pts] for pts in wanted]), size)


def _read_decord(reader: VideoReader, num_frames: int, mode: Mode, rng, span: Span | None = None) -> np.ndarray:
    if span is None:
        return reader.get_batch(list(segment_indices(len(reader), num_frames, mode, rng))).asnumpy()  # [N, H, W, 3]
    starts = reader.get_frame_timestamp(range(len(reader)))[:, 0]
    check_span(span, float(reader.get_frame_timestamp(len(reader) - 1)[1]) if len(reader) else None)
    inside = np.flatnonzero((starts >= span[0]) & (starts < span[1]))
    if not inside.size:
        raise DecodeError(f"span {span[0]:g}-{span[1]:g} s holds no frame of the video")
    return reader.get_batch(list(inside[segment_indices(inside.size, num_frames, mode, rng)])).asnumpy()


def _resize(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _decode_decord(media: Media, num_frames: int, size: int, mode: Mode, rng, span: Span | None = None) -> np.ndarray:
    width, height = _scaled(*probe_size(media), size)
    try:
        try:
            reader = VideoReader(reader_input(media), ctx=cpu(0), width=width, height=height, num_threads=1)
            frames = _read_decord(reader, num_frames, mode, rng, span)
        except _DECORD_ERRORS as e:
            if "must exactly match" not in str(e):
                raise
            # decord's scaler mis-sizes some small outputs (e.g. 16, 24, 48 px wide): decode at the native size
            # and resize here instead.
            reader = VideoReader(reader_input(media), ctx=cpu(0), num_threads=1)
            frames = _resize(_read_decord(reader, num_frames, mode, rng, span), width, height)
    except _DECORD_ERRORS as e:
        raise _undecodable(e) from None
    return _crop(frames, size)


def decode_video(
    source: Media | None,
    num_frames: int,
    size: int,
    mode: Mode,
    rng: np.random.Generator | None = None,
    decoder: str = "pyav",
    span: Span | None = None,
) -> np.ndarray:
    """uint8 [num_frames, 3, size, size] from a local path, a storage URI, or a clip's bytes (see load_media), of
    the whole video or of a span of it. Raises DecodeError with the reason for any file it cannot use."""
    media = load_media(source, "video")
    if decoder == "pyav":
        return _decode_pyav(media, num_frames, size, mode, rng, span)
    if decoder == "decord":
        return _decode_decord(media, num_frames, size, mode, rng, span)
    raise ValueError(f"unknown video decoder {decoder!r}: use one of {', '.join(DECODERS)} (data.video.decoder)")

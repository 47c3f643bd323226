"""A clip that is a span of a longer video: (start, end) seconds on the video's timeline.

Manifests of InternVid, HowTo100M, VAST-27M and the like name clips as spans of long videos. The decoders seek
to the span and read only it, for frames and audio alike, so one video gives many clips at the cost of each.
Times are measured from the stream's first timestamp, as `ffmpeg -ss` measures them.
"""

from __future__ import annotations

import math
from fractions import Fraction

from gram_ray.data.errors import DecodeError

__all__ = ["Span", "END_SLACK_S", "check_span", "stream_duration", "to_pts", "pts_seconds"]

Span = tuple[float, float]

# A manifest's end time rounded up (12.0 for a video of 11.97 s) is not an error: the span is cut at the end.
END_SLACK_S = 1.0


def stream_duration(container, stream) -> float | None:
    """The stream's length in seconds from the container's header, or None where the header does not say."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def check_span(span: Span, duration: float | None) -> None:
    """DecodeError naming a span that cannot be cut from a video of this duration."""
    start, end = span
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end <= start:
        raise DecodeError(f"span {start:g}-{end:g} s is not a span (want 0 <= start < end)")
    if duration is None:
        return
    if start >= duration:
        raise DecodeError(f"span {start:g}-{end:g} s starts past the video's end ({duration:.2f} s)")
    if end > duration + END_SLACK_S:
        raise DecodeError(f"span {start:g}-{end:g} s ends past the video's end ({duration:.2f} s)")


def _origin(stream) -> int:
    return stream.start_time if stream.start_time is not None else 0


def to_pts(stream, seconds: float) -> int:
    """The stream timestamp at `seconds` into it (rounded down)."""
    return _origin(stream) + math.floor(Fraction(seconds).limit_denominator(1_000_000) / stream.time_base)


def pts_seconds(stream, pts: int) -> Fraction:
    """Seconds into the stream of a timestamp, exactly."""
    return (pts - _origin(stream)) * stream.time_base

"""Sources whose media travel inside the data files: WebDataset tar shards and video2dataset's Parquet output.

video2dataset (the common downloader for WebVid, MSR-VTT, Kinetics, HD-VILA, ...) writes `00000.tar`, ...: each
sample is `{key}.mp4`, `{key}.txt` (the caption) and `{key}.json` (url, caption, key, status, error_message, any
extra columns such as MSR-VTT's caption_0..caption_19), plus `{key}.m4a` when audio was asked for separately.
Failed downloads stay in the tar as txt + json without the mp4. Its `parquet` output format holds the same fields
as columns, the media bytes in an `mp4` (and `m4a`) column.

Each shard is read by one decode task as a stream from storage: a tar member by member, a Parquet file a row
group at a time. Only one sample's members are held at once, and a member larger than data.source.max_member_mb
is skipped unread, so a task's memory is bounded by that setting and the cache writer's buffer (data.shard_mb),
not by the shard's size. Ray Data's read_webdataset is not used: it reads a whole tar in one task and groups 512
samples per block (512 videos in one worker's memory), and fails on video2dataset's sidecar .parquet and
_stats.json files and on samples without a json.

A sample becomes a ClipInput: id (the key, or data.source.fields.id of its json), captions (the json's caption
fields, else the txt member), audio (the first audio member, else the video's own track). A sample that cannot
be used carries its reason (no video, a download that failed, a key with a dot) and is counted in the report.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from gram_ray import storage
from gram_ray.config import SourceConfig
from gram_ray.data.decode import ClipInput
from gram_ray.data.manifest import ManifestError, field_captions

__all__ = ["PACKED", "ShardError", "expand_braces", "shard_uris", "tar_clips", "parquet_clips", "SHARD_SUFFIXES"]

SHARD_SUFFIXES = {"webdataset": (".tar", ".tar.gz", ".tgz"), "parquet": (".parquet",)}
PACKED = tuple(SHARD_SUFFIXES)  # the data.source kinds whose media are inside the shards
_MB = 2**20
READ_BUFFER = 8 * _MB  # a shard is read from storage in requests of this size


class ShardError(Exception):
    """A shard that cannot be read (further): not a tar, or cut off mid-member. The samples before it are kept."""


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace patterns, as webdataset and open_clip expand them (braceexpand, bash's rules): {a,b,c},
    nested ({a,{b,c}}), and ranges {00000..00999} zero-padded to the widest end written. A range that runs
    backwards ({9..1}) is refused: bash would list it downwards, and in a shard list that is a typo."""
    from braceexpand import braceexpand

    for lo, hi in re.findall(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.-?\d+)?\}", pattern):
        if int(hi) < int(lo):
            raise ManifestError(f"shard pattern {pattern!r}: the range {{{lo}..{hi}}} runs backwards")
    return list(braceexpand(pattern))


def shard_uris(spec: str, kind: str) -> list[str]:
    """The shard files a spec names: a brace pattern, one file, or a folder (or bucket prefix) whose shard files
    are taken in name order, sidecars (video2dataset's .parquet next to its tars, _stats.json) left out.
    ManifestError naming the first that is missing, or a folder with none."""
    suffixes = SHARD_SUFFIXES[kind]
    if "{" in spec:
        uris = expand_braces(spec)
    else:
        fs, path = storage.resolve(spec)
        try:
            is_dir = storage.with_retries("looking up", spec, lambda: fs.get_file_info(path).type.name == "Directory")
        except OSError as e:
            raise ManifestError(f"cannot reach {spec}: {str(e).splitlines()[0][:300]}") from None
        if not is_dir:
            uris = [spec]
        else:
            uris = [p for p in storage.list_files(spec) if p.endswith(suffixes)]
            if not uris:
                raise ManifestError(f"{spec} holds no {' or '.join(suffixes)} shards")
            return sorted(uris)
    listed: dict[str, set[str]] = {}  # a pattern's folder is listed once, not asked about each shard
    for uri in uris:
        folder = posixpath.dirname(uri) if storage.is_uri(uri) else str(Path(uri).parent)
        if folder not in listed:
            try:
                listed[folder] = set(storage.list_names(folder))
            except FileNotFoundError:
                listed[folder] = set()
            except OSError as e:
                raise ManifestError(f"cannot reach {uri}: {str(e).splitlines()[0][:300]}") from None
        if posixpath.basename(uri) not in listed[folder]:
            raise ManifestError(f"shard {uri} does not exist" + (f" (from the pattern {spec})" if "{" in spec else ""))
    return uris


def _name(uri: str) -> str:
    return posixpath.basename(uri)


def _clip(key: str, meta: dict | None, media: dict[str, object], caption: str | None, source: SourceConfig, shard: str):
    """One sample as a ClipInput (its .error set when it cannot be used). media: extension -> bytes, or a str
    saying why the member was not read."""
    fields = source.fields
    # A failed download first: its json holds little more than its url and status (no id field, no caption).
    if meta is not None and source.status_field in meta and meta[source.status_field] != "success":
        detail = meta.get("error_message")
        return ClipInput(
            str(meta.get(fields.id) or key) if fields.id else key,
            [],
            error=f"download status {meta[source.status_field]}" + (f": {str(detail)[:200]}" if detail else ""),
            absent=True,  # an absence the shard records, expected at scale (rotted URLs): not a failure to decode
        )
    clip_id = key
    if meta is not None and fields.id:
        if meta.get(fields.id) in (None, ""):
            return ClipInput(
                key,
                [],
                error=f"no id field in the json: sample {key} of {shard} has no {fields.id!r} (data.source.fields.id)",
            )
        clip_id = str(meta[fields.id])
    video_ext = next((e for e in source.video_extensions if e in media), None)
    if video_ext is None:
        wanted = ", ".join(f".{e}" for e in source.video_extensions)
        return ClipInput(clip_id, [], error=f"no video member ({wanted}) in {shard}")
    try:
        captions = field_captions(meta, fields.captions) if meta else None
    except ValueError as e:
        return ClipInput(clip_id, [], error=f"bad caption field: sample {key} of {shard}: {e}")
    if captions is None and caption:
        captions = [caption]
    if captions is None:
        return ClipInput(
            clip_id,
            [],
            error=f"no caption: no .{source.caption_extension} member and no caption "
            f"field ({', '.join(fields.captions)}) in its json ({shard})",
        )
    audio_ext = next((e for e in source.audio_extensions if e in media), None)
    for ext in (video_ext, audio_ext):
        if isinstance(media.get(ext), str):  # too large: not read
            return ClipInput(clip_id, captions, error=media[ext])
    span = None
    if meta is not None and fields.start and fields.end and meta.get(fields.start) is not None:
        try:
            span = (float(meta[fields.start]), float(meta[fields.end]))
        except (TypeError, ValueError):
            return ClipInput(
                clip_id,
                captions,
                error=f"span not in seconds: sample {key} of {shard}: {meta.get(fields.start)!r}-"
                f"{meta.get(fields.end)!r} is not in seconds",
            )
    subtitle = meta.get(fields.subtitle) if meta is not None and fields.subtitle else None
    return ClipInput(
        clip_id,
        captions,
        subtitle=str(subtitle or ""),
        video=media[video_ext],
        audio=media[audio_ext] if audio_ext else None,
        span=span,
    )


def _sample(key: str, members: dict[str, object], source: SourceConfig, shard: str) -> ClipInput:
    meta, caption = None, None
    raw = members.get(source.json_extension)
    if isinstance(raw, bytes):
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return ClipInput(
                key,
                [],
                error=f"invalid json member: sample {key} of {shard}: its .{source.json_extension} is not JSON ({e})",
            )
        if not isinstance(meta, dict):
            meta = None
    text = members.get(source.caption_extension)
    if isinstance(text, bytes):
        caption = text.decode("utf-8", errors="replace").strip() or None
    return _clip(key, meta, members, caption, source, shard)


def tar_clips(uri: str, source: SourceConfig) -> Iterator[ClipInput]:
    """The samples of one tar shard, read as a stream, as ClipInputs. Raises ShardError (after yielding the samples
    before it) for a file that is not a tar or is cut off mid-member."""
    samples = _TarSamples(source, _name(uri))
    for member, read in _tar_members(uri, samples.shard):
        yield from samples.add(member, read)
    yield from samples.finish()


def _tar_members(uri: str, shard: str) -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """The file members of one tar shard, read as a stream: (member, a reader of its bytes, valid until the next
    member). ShardError for a file that is not a tar, cut off mid-member or before its end, or unreadable."""
    fs, path = storage.resolve(uri)
    member = last = None
    try:
        size = fs.get_file_info(path).size
        # Read through a buffer: tarfile asks for 10 KB at a time, each a ranged GET from a bucket otherwise.
        with (
            fs.open_input_stream(path, buffer_size=READ_BUFFER) as stream,
            tarfile.open(fileobj=stream, mode="r|*") as tar,
        ):
            while (member := tar.next()) is not None:
                last = member
                tar.members.clear()  # the stream reader would otherwise keep every member's header
                if member.isfile():
                    yield member, lambda member=member: _read_member(tar, member, shard)
            # tarfile takes a header cut off mid-way for the end of the archive; a whole tar ends with two zero
            # blocks after its last member. Without them the last sample may be incomplete: it is not used.
            if size is not None and size - tar.offset < 2 * tarfile.BLOCKSIZE and not uri.endswith(("gz", "tgz")):
                after = f" after member {last.name}" if last is not None else ""
                raise ShardError(
                    f"shard cut off before its end: {shard} ends{after} without the end-of-archive blocks; the "
                    "samples before the last are kept"
                )
    except (tarfile.ReadError, OSError) as e:
        raise _shard_error(e, shard, member) from None


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str) -> bytes:
    """A member's bytes, read while the stream is at it (by the sample grouping, between two members)."""
    try:
        return tar.extractfile(member).read()
    except (tarfile.ReadError, OSError) as e:
        raise _shard_error(e, shard, member) from None


def _shard_error(error: Exception, shard: str, member: tarfile.TarInfo | None) -> ShardError:
    """What a tar's read error means: not a tar (before its first member), cut off inside a member, or storage."""
    if isinstance(error, tarfile.ReadError):
        if member is None:
            return ShardError(f"not a tar file: {shard} ({error})")
        return ShardError(
            f"shard cut off inside a member: {shard} (in {member.name}: {error}); the samples before it are kept"
        )
    return ShardError(f"shard cannot be read: {shard} ({str(error).splitlines()[0][:200]})")


class _TarSamples:
    """Groups a tar's members into samples as WebDataset does (a sample: the adjacent members sharing a key, the
    name up to its first dot), and says what is wrong with a sample it cannot group."""

    def __init__(self, source: SourceConfig, shard: str) -> None:
        self.source, self.shard = source, shard
        self.media = {*source.video_extensions, *source.audio_extensions}
        self.wanted = self.media | {source.caption_extension, source.json_extension}
        self.key, self.members = None, {}
        self.dotted_seen = self.split = None
        self.seen: set[str] = set()  # the keys already yielded: a key's members must be adjacent

    def add(self, member: tarfile.TarInfo, read: Callable[[], bytes]) -> Iterator[ClipInput]:
        folder, base = posixpath.split(member.name)
        stem, _, ext = base.partition(".")
        ext = ext.lower()
        if ext not in self.wanted:
            if "." in ext and ext.rsplit(".", 1)[1] in self.wanted:  # "0001.5.mp4": a dot inside the key
                yield from self._dotted(member, posixpath.join(folder, base.rsplit(".", 1)[0]))
            return
        key = posixpath.join(folder, stem)
        if key == self.split:  # the rest of a key met again (below): not used
            return
        if key != self.key:
            yield from self.finish()
            self.key, self.members, self.split = key, {}, None
            if key in self.seen:  # WebDataset wants a sample's members adjacent: this one is split
                yield ClipInput(
                    key,
                    [],
                    error=f"members not adjacent: key {key!r} of {self.shard} comes again after other keys "
                    "(re-create the tar with its members sorted by name, e.g. tar --sort=name)",
                )
                self.key, self.split = None, key
                return
        limit = self.source.max_member_mb * _MB
        if ext in self.media and member.size > limit:
            self.members[ext] = (
                f"member {member.name} is {member.size / _MB:.0f} MB, more than data.source.max_member_mb "
                f"({self.source.max_member_mb:g}): not read ({self.shard})"
            )
            return
        self.members[ext] = read()

    def _dotted(self, member: tarfile.TarInfo, dotted: str) -> Iterator[ClipInput]:
        if dotted == self.dotted_seen:  # its other members: the sample is counted once
            return
        self.dotted_seen = dotted
        if self.key is not None:
            yield _sample(self.key, self.members, self.source, self.shard)
        self.key, self.members = None, {}
        yield ClipInput(
            dotted,
            [],
            error=f"a key with a dot: member {member.name!r} of {self.shard} (its key {dotted!r} holds a dot). "
            "WebDataset keys end at the first dot of a member's name, so this sample's members cannot be grouped: "
            "rename them without dots in the key (video2dataset's keys have none)",
        )

    def finish(self) -> Iterator[ClipInput]:
        """The sample being grouped, if any (at the next key, or at the tar's end)."""
        if self.key is not None:
            yield _sample(self.key, self.members, self.source, self.shard)
            self.seen.add(self.key)
            self.key = None


def parquet_clips(uri: str, source: SourceConfig, rows_at_once: int = 8) -> Iterator[ClipInput]:
    """The rows of one video2dataset Parquet file (media bytes in columns named by extension: mp4, m4a, ...) as
    ClipInputs, a few rows at a time."""
    import pyarrow.parquet as pq

    shard = _name(uri)
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            reader = pq.ParquetFile(f)
            names = set(reader.schema_arrow.names)
            video_column = source.fields.video or next((e for e in source.video_extensions if e in names), None)
            if video_column is None or video_column not in names:
                looked = source.fields.video or ", ".join(source.video_extensions)
                raise ShardError(f"no video column: {shard} has none (looked for {looked}; columns: {sorted(names)})")
            id_column = source.fields.id or "key"
            rows = (row for batch in reader.iter_batches(batch_size=rows_at_once) for row in batch.to_pylist())
            for n, row in enumerate(rows):  # n: the row in the file (a key of last resort, unique within it)
                key = str(row.get(id_column) or row.get("key") or f"{shard}[{n}]")
                media = {}
                video = row.pop(video_column, None)
                if isinstance(video, bytes) and video:
                    media[source.video_extensions[0]] = video
                audio_column = next((e for e in source.audio_extensions if e in row), None)
                audio = row.pop(audio_column, None) if audio_column else None
                if isinstance(audio, bytes) and audio:
                    media[audio_column] = audio
                caption = row.get(source.caption_extension)
                meta = {k: v for k, v in row.items() if not isinstance(v, bytes)}
                yield _clip(key, meta, media, caption if isinstance(caption, str) else None, source, shard)
    except ShardError:
        raise
    except OSError as e:
        raise ShardError(f"shard cannot be read: {shard} ({str(e).splitlines()[0][:200]})") from None
    except Exception as e:  # pyarrow's errors for a file that is not Parquet
        raise ShardError(f"not a Parquet file: {shard} ({str(e).splitlines()[0][:200]})") from None

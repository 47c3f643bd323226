"""The search index on storage: what `gram-ray index` writes and `gram-ray search` reads.

Layout (a local folder or a storage URI):
  <index>/index.json             format, the checkpoint it was built with, modalities, dtype, its sources, and
                                 whether it is complete (false while a build runs; true, written last, at its end)
  <index>/shards/<source>-<cache file>.parquet   one shard per cache file: per clip its id, captions, each
                                 modality's L2-normalised embedding, the caption embeddings, the orthonormal basis
                                 of its non-text modalities' span and that span's squared volume (what search's
                                 closed form reads), a thumbnail (one JPEG frame) and where its media are
  <index>/_done/<shard>.json     written after its shard: a shard without it is redone

Built with Ray Data: one actor per worker embeds whole cache files (the model loaded once per actor, on its GPU
when the cluster has GPUs) and writes their shards itself, so nothing but a count per file reaches the driver.
A run that stops is continued by the next run with the same arguments: the shards recorded as done are kept.
Another source (`--data` of other clips) adds shards; clips already in the index are not embedded again. An
index holds the embeddings of one checkpoint only: embeddings of another model are not comparable, so adding
with another checkpoint is refused.

Reading (`load_index`) needs pyarrow and torch only.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from gram_ray import storage
from gram_ray.data.clip_ids import id_array, without_ids
from gram_ray.data.pieces import done_pieces, drive, record_done
from gram_ray.retrieval.search import ClipIndex

__all__ = ["SearchIndexError", "build_index", "load_index", "shard_table", "LoadedIndex", "INDEX_FILE", "FORMAT"]

INDEX_FILE = "index.json"
SHARDS = "shards"
FORMAT = 1
THUMBNAIL_QUALITY = 85


class SearchIndexError(RuntimeError):
    """An index that cannot be built or read as asked; the message says what to do."""


@dataclass
class LoadedIndex:
    """An index read back: the search tensors and, in the same order, what a result shows."""

    meta: dict
    ids: list[str]
    captions: list[list[str]]
    clips: ClipIndex
    caption_embeddings: torch.Tensor  # [total captions, D]
    caption_clip: np.ndarray  # [total captions] row of each caption's clip
    thumbnails: list[bytes | None]
    video_paths: list[str | None]
    audio_paths: list[str | None]
    sources: np.ndarray  # [N] the index of each clip's source in meta["sources"]


def _fixed_list(values: np.ndarray, dtype) -> pa.Array:
    """[N, ...] -> fixed_size_list<dtype, prod(...)> (one row per clip)."""
    flat = np.ascontiguousarray(values.astype(dtype)).reshape(len(values), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def _from_fixed_list(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    array = column.combine_chunks()
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), *shape).copy()


def _checkpoint_identity(checkpoint_dir: str) -> dict:
    """Which weights an index holds the embeddings of: the path, the state file's size and its modification time
    (a checkpoint rewritten in place is another model)."""
    from gram_ray.model.checkpoint import STATE_FILE

    info = storage.file_infos(checkpoint_dir).get(STATE_FILE)
    return {"path": checkpoint_dir, "bytes": info.size if info else None, "mtime_ns": info.mtime_ns if info else None}


def _source_id(cache_key: str, checkpoint: dict) -> str:
    return hashlib.sha256(json.dumps([cache_key, checkpoint], sort_keys=True).encode()).hexdigest()[:10]


def _concat(parts: list[dict]) -> dict | None:
    """One dict of columns from the per-batch dicts (lists joined, arrays concatenated)."""
    if not parts:
        return None
    return {
        k: [x for p in parts for x in p[k]] if isinstance(v, list) else np.concatenate([p[k] for p in parts])
        for k, v in parts[0].items()
    }


class _IndexCacheFile:
    """map_batches UDF (an actor): embeds every clip of the cache files it is given and writes their index shards."""

    def __init__(self, checkpoint_dir, out, source, video_dir, audio_dir, dtype, known_ids, batch_size) -> None:
        from gram_ray.data.manifest import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, media_finder
        from gram_ray.retrieval.inference import inference_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, cfg, self.collate = inference_model(checkpoint_dir, self.device, every_caption=True)
        self.others = [m for m in cfg.model.modalities if m != "text"]
        self.out, self.source, self.dtype, self.batch_size = out, source, np.dtype(dtype), batch_size
        self.known_ids = known_ids
        vision = cfg.data.video.format  # where a clip's frames came from: a video file, an image, or nothing
        extensions = IMAGE_EXTENSIONS if vision == "image" else VIDEO_EXTENSIONS
        self.find_video = media_finder(video_dir, extensions) if video_dir and vision != "none" else None
        self.find_audio = media_finder(audio_dir, AUDIO_EXTENSIONS) if audio_dir else None

    def __call__(self, batch: dict) -> dict:
        files, clips = [], []
        for cache_file, shard in zip(batch["file"], batch["shard"], strict=True):
            clips.append(self._index_file(str(cache_file), str(shard)))
            files.append(str(shard))
        return {"shard": np.asarray(files, dtype=object), "clips": np.asarray(clips, dtype=np.int64)}

    def _index_file(self, cache_file: str, shard: str) -> int:
        table = storage.read_table(cache_file)
        if len(self.known_ids):  # clips another source already put in the index: not embedded again
            table = without_ids(table, self.known_ids)
        parts = [self._embed(table.slice(s, self.batch_size)) for s in range(0, table.num_rows, self.batch_size)]
        written = self._write(shard, _concat([p for p in parts if p is not None]))
        record_done(self.out, shard.removesuffix(".parquet"), {"clips": written})
        return written

    def _embed(self, table: pa.Table) -> dict | None:
        from gram_ray.data.parquet_layout import numpy_rows
        from gram_ray.data.schema import FRAMES_JPEG, IDS, TEXT_TO_VIDEO
        from gram_ray.model.device import to_device
        from gram_ray.volume import orthonormal_span

        rows = numpy_rows(table)
        model_batch = self.collate(rows)
        ids = model_batch[IDS]
        if not ids:
            return None
        with torch.no_grad():
            emb = {m: e.cpu() for m, e in self.model.embed(to_device(model_batch, self.device)).items()}
        basis, span_volume_sq = orthonormal_span(*(emb[m] for m in self.others))
        t2v = model_batch[TEXT_TO_VIDEO].numpy()
        position = {str(i): n for n, i in enumerate(rows["id"])}
        kept = [position[i] for i in ids]
        captions = [[str(c) for c in rows["captions"][n]] for n in kept]
        return {
            "id": list(ids),
            "captions": captions,
            "caption_embeddings": [emb["text"][t2v == r].numpy() for r in range(len(ids))],
            "thumbnail": [self._thumbnail(rows, n, FRAMES_JPEG) for n in kept],
            "video_path": [self.find_video(i) if self.find_video else None for i in ids],
            "audio_path": [self.find_audio(i) if self.find_audio else None for i in ids],
            "span_volume_sq": span_volume_sq.float().numpy(),
            "basis": basis.numpy(),
            **{m: emb[m].numpy() for m in self.others},
        }

    @staticmethod
    def _thumbnail(rows: dict, n: int, jpeg_column: str) -> bytes | None:
        """The clip's middle frame as a JPEG: taken as it is from a JPEG cache, encoded from a raw one."""
        if jpeg_column in rows:
            frames = list(rows[jpeg_column][n])
            return bytes(frames[len(frames) // 2]) if frames else None
        if "frames" not in rows:
            return None  # a clip without video (text-audio): the gallery shows its audio player
        from torchvision.io import encode_jpeg

        frames = np.asarray(rows["frames"][n])
        frames = frames.reshape(-1, *frames.shape[-3:])
        return bytes(encode_jpeg(torch.from_numpy(np.ascontiguousarray(frames[len(frames) // 2])), THUMBNAIL_QUALITY))

    def _write(self, shard: str, columns: dict | None) -> int:
        path = storage.join(self.out, SHARDS, shard)
        if columns is None:  # every clip of the file was already in the index (or had no usable audio)
            storage.delete_file(path)
            return 0
        table = shard_table(columns, self.others, self.dtype, self.source)
        storage.write_bytes_with(path, lambda f: pq.write_table(table, f))
        return table.num_rows


def shard_table(c: dict, others: list[str], dtype, source: int) -> pa.Table:
    """One index shard: columns as _IndexCacheFile._embed makes them (per clip: id, captions, caption embeddings
    [n_captions, D], thumbnail, media paths, span_volume_sq, basis [m, D], each modality's embedding [D])."""
    dtype = np.dtype(dtype)
    n, dim = len(c["id"]), c["basis"].shape[-1]
    value = pa.from_numpy_dtype(dtype)
    text = [
        pa.FixedSizeListArray.from_arrays(pa.array(e.astype(dtype).reshape(-1)), dim) for e in c["caption_embeddings"]
    ]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in c["caption_embeddings"]])]).astype(np.int32)
    return pa.table(
        {
            "id": pa.array(c["id"], pa.string()),
            "source": pa.array(np.full(n, source, np.int32)),
            "captions": pa.array(c["captions"], pa.list_(pa.string())),
            "caption_embeddings": pa.ListArray.from_arrays(
                pa.array(offsets), pa.concat_arrays(text) if text else pa.array([], pa.list_(value, dim))
            ),
            "thumbnail": pa.array(c["thumbnail"], pa.binary()),
            "video_path": pa.array(c["video_path"], pa.string()),
            "audio_path": pa.array(c["audio_path"], pa.string()),
            "span_volume_sq": pa.array(c["span_volume_sq"].astype(np.float32)),
            "basis": _fixed_list(c["basis"], dtype),
            **{m: _fixed_list(c[m], dtype) for m in others},
        }
    )


def _read_meta(index_dir: str) -> dict | None:
    path = storage.join(index_dir, INDEX_FILE)
    return storage.read_json(path) if storage.exists(path) else None


def _cache_of(data_dir: str) -> tuple[str, dict]:
    """(shards folder, report) of a `gram-ray preprocess --out` folder."""
    report_path = storage.join(data_dir, "report.json")
    shards = storage.join(data_dir, "shards")
    if not storage.exists(shards) or not storage.exists(report_path):
        raise SearchIndexError(
            f"{data_dir} is not a preprocessed cache (no shards/ and report.json in it): give a `gram-ray "
            "preprocess --out` folder, or the annotations and media with --annotations and --video-dir"
        )
    return shards, storage.read_json(report_path)


def build_index(
    checkpoint_dir: str,
    data_dir: str,
    out: str,
    dtype: str = "float32",
    workers: int = 1,
    batch_size: int = 64,
    log=print,
) -> dict:
    """Embed every clip of a cache into the index at `out` (created, continued, or added to); returns index.json.
    Resumable (data/pieces.py): a cache file is a piece, recorded when its shard is written."""
    if dtype not in ("float16", "float32"):
        raise SearchIndexError(f"--dtype must be float16 or float32, got {dtype!r}")
    checkpoint_dir, data_dir, out = storage.absolute(checkpoint_dir), storage.absolute(data_dir), storage.absolute(out)
    shards_dir, report = _cache_of(data_dir)
    meta, source = _open_index(checkpoint_dir, data_dir, out, dtype, report)
    source_id = meta["sources"][source]["id"]
    todo, known_ids = _todo(shards_dir, out, source_id, log)
    start = time.perf_counter()
    if todo:
        log(
            f"indexing {len(todo)} cache files of {data_dir} with {checkpoint_dir} into {out} "
            f"({workers} worker{'s' if workers > 1 else ''}"
            + (f"; {len(known_ids)} clips already in the index are skipped" if len(known_ids) else "")
            + ") ..."
        )
        options = {"checkpoint_dir": checkpoint_dir, "out": out, "source": source, "dtype": dtype}
        options |= {"video_dir": report.get("video_dir"), "audio_dir": report.get("audio_dir")}
        _embed_files(todo, options | {"known_ids": known_ids, "batch_size": batch_size}, workers, log)
    return _complete(meta, out, time.perf_counter() - start, log)


def _open_index(checkpoint_dir: str, data_dir: str, out: str, dtype: str, report: dict) -> tuple[dict, int]:
    """index.json of the index at out (a new one when there is none), with this cache as one of its sources,
    written back marked incomplete; and the source's position. Another checkpoint's index is refused."""
    from gram_ray.model.checkpoint import checkpoint_config

    cfg = checkpoint_config(checkpoint_dir)
    checkpoint = _checkpoint_identity(checkpoint_dir)
    meta = _read_meta(out) or {
        "format": FORMAT,
        "checkpoint": checkpoint,
        "modalities": [m for m in cfg.model.modalities if m != "text"],
        "embed_dim": cfg.model.embed_dim,
        "dtype": dtype,
        "sources": [],
        "clips": 0,
    }
    if meta["checkpoint"] != checkpoint:
        raise SearchIndexError(
            f"{out} holds embeddings of the checkpoint {meta['checkpoint']['path']} as it was then; embeddings of "
            f"{checkpoint_dir} (or of that checkpoint rewritten since) are not comparable with them. Build a new "
            "index with another --out"
        )
    if meta["dtype"] != dtype:
        raise SearchIndexError(f"{out} stores {meta['dtype']}; add to it with --dtype {meta['dtype']}")
    source_id = _source_id(report["cache_key"], checkpoint)
    ids = [s["id"] for s in meta["sources"]]
    if source_id not in ids:
        keys = ("annotations", "video_dir", "audio_dir")
        meta["sources"].append({"id": source_id, "data": data_dir} | {k: report.get(k) for k in keys} | {"clips": 0})
        ids.append(source_id)
    meta["complete"] = False  # until every cache file is indexed: search refuses the index meanwhile
    storage.write_text(storage.join(out, INDEX_FILE), json.dumps(meta, indent=2))
    return meta, ids.index(source_id)


def _todo(shards_dir: str, out: str, source_id: str, log) -> tuple[list[dict], pa.Array]:
    """(the cache files of this source not indexed yet, each with its shard's name; the clips other sources put in
    the index, which are not embedded again)."""
    cache_files = storage.list_files(shards_dir, ".parquet")
    done = done_pieces(out)
    todo = [
        {"file": f, "shard": f"{source_id}-{posixpath.basename(f)}"}
        for f in cache_files
        if f"{source_id}-{posixpath.basename(f).removesuffix('.parquet')}" not in done
    ]
    others = storage.list_files(storage.join(out, SHARDS), ".parquet")
    known_ids = _ids([p for p in others if not posixpath.basename(p).startswith(source_id)])
    if len(todo) < len(cache_files):
        log(f"resuming: {len(cache_files) - len(todo)} of {len(cache_files)} cache files are indexed already")
    return todo, known_ids


def _embed_files(todo: list[dict], options: dict, workers: int, log) -> None:
    """Index the cache files in Ray Data actors (one model each, on a GPU when the cluster has them) that write
    their shards and records themselves."""
    import ray
    import ray.data

    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
        _IndexCacheFile,
        fn_constructor_kwargs=options,
        batch_size=1,
        batch_format="numpy",
        num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(todo)))),
    )
    drive(ds.iter_rows(), len(todo), "cache files", log, every_s=10.0)


def _complete(meta: dict, out: str, wall: float, log) -> dict:
    """index.json with every source's clips counted, marked complete (written last: every shard is whole and
    recorded)."""
    counts = _counts(out)
    for i, s in enumerate(meta["sources"]):
        s["clips"] = counts.get(i, 0)
    meta["clips"] = sum(counts.values())
    meta["complete"] = True
    storage.write_text(storage.join(out, INDEX_FILE), json.dumps(meta, indent=2))
    log(f"index {out}: {meta['clips']} clips from {len(meta['sources'])} source(s) ({wall:.1f} s)")
    return meta


def _ids(shards: list[str]) -> pa.Array:
    """The distinct clip ids of index shards, as an Arrow array (no Python object per id)."""
    chunks = [c for path in shards for c in storage.read_table(path, columns=["id"]).column("id").chunks]
    return pc.unique(pa.chunked_array(chunks, pa.string())) if chunks else id_array([])


def _counts(out: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for path in storage.list_files(storage.join(out, SHARDS), ".parquet"):
        source = storage.read_table(path, columns=["source"]).column("source").to_numpy()
        for s, n in zip(*np.unique(source, return_counts=True), strict=True):
            counts[int(s)] = counts.get(int(s), 0) + int(n)
    return counts


def load_index(index_dir: str | Path) -> LoadedIndex:
    """Read a whole index into memory (ordered by shard name, then row)."""
    index_dir = storage.absolute(index_dir)
    meta = _read_meta(index_dir)
    if meta is None:
        raise SearchIndexError(
            f"{index_dir} is not a gram-ray index (no {INDEX_FILE}): build one with `gram-ray index`"
        )
    if meta.get("format") != FORMAT:
        raise SearchIndexError(f"{index_dir} is index format {meta.get('format')}; this gram-ray reads format {FORMAT}")
    if meta.get("complete") is False:  # indexes built before the flag existed have none: they were whole
        raise SearchIndexError(
            f"{index_dir} is not complete: its build is running or was stopped (killed, or storage failed); run "
            "the same `gram-ray index` again to finish it (the shards already written are kept)"
        )
    paths = sorted(storage.list_files(storage.join(index_dir, SHARDS), ".parquet"))
    if not paths:
        raise SearchIndexError(f"{index_dir} holds no clips yet (no shards): run `gram-ray index` to its end")
    table = pa.concat_tables([storage.read_table(path) for path in paths])
    dim, others = meta["embed_dim"], meta["modalities"]
    dtype = getattr(torch, meta["dtype"])
    caption_lists = table.column("caption_embeddings").combine_chunks()
    caption_embeddings = caption_lists.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).copy()
    per_clip = np.diff(caption_lists.offsets.to_numpy())
    clips = ClipIndex(
        {m: torch.from_numpy(_from_fixed_list(table.column(m), (dim,))).to(dtype) for m in others},
        torch.from_numpy(_from_fixed_list(table.column("basis"), (len(others), dim))).to(dtype),
        torch.tensor(table.column("span_volume_sq").to_numpy()).float(),
    )
    return LoadedIndex(
        meta=meta,
        ids=table.column("id").to_pylist(),
        captions=table.column("captions").to_pylist(),
        clips=clips,
        caption_embeddings=torch.from_numpy(caption_embeddings).to(dtype),
        caption_clip=np.repeat(np.arange(table.num_rows), per_clip),
        thumbnails=table.column("thumbnail").to_pylist(),
        video_paths=table.column("video_path").to_pylist(),
        audio_paths=table.column("audio_path").to_pylist(),
        sources=table.column("source").to_numpy(),
    )

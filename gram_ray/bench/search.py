"""`gram-ray bench search`: exact search by volume over a large synthetic index.

An index of N clips (default 1,000,000; k = 3: each clip has 2 non-text modalities; D = 512) is generated in
memory, in float16 and in float32, the way `gram-ray index` stores it (embeddings, each clip's span basis and
squared span volume). For each dtype it reports:
  - the latency of 1 query and of a batch of queries (default 1,000), the index already where it is searched
    (the GPU's memory with --device cuda), the median of --reps runs after one warm-up;
  - the bytes per clip of the tensors search reads, and of the index as stored (Parquet; without thumbnails,
    which add a JPEG each);
  - the peak memory search takes beyond the index itself (the CPU process's resident set, reset before each
    search through /proc/self/clear_refs; on a GPU, torch's peak allocation);
  - whether 1 query's top k equals brute force by gram_volume over the same stored embeddings;
  - what exactness costs: the batch through the closed-form GEMM scan alone (each query's top k by the estimate,
    no bound, no exact pass: fast and not exact), side by side with the exact search, and how many candidates a
    query the error bound keeps for the exact pass (mean and max over the batch).
Queries lie near some clip's modalities (as a caption near its clip), so the top k are in the regime where the
closed form alone would lose digits and the exact pass decides.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gram_ray.bench.common import process_memory
from gram_ray.retrieval.search import (
    ClipIndex,
    merge_topk,
    scan_rows,
    search_clips,
    squared_volumes,
    volume_candidates,
)
from gram_ray.volume import gram_volume, orthonormal_span

__all__ = ["SearchBenchResult", "bench_search", "search_table", "synthetic_index", "as_json"]

_CHUNK = 65_536  # clips generated (and orthonormalised in float64) at a time


@dataclass
class SearchBenchResult:
    dtype: str
    clips: int
    modalities: int  # k, the query included
    dim: int
    device: str
    one_query_ms: float
    batch_queries: int
    batch_ms: float
    search_bytes_per_clip: int
    stored_bytes_per_clip: float
    peak_search_bytes: int | None
    exact: bool
    scan_only_batch_ms: float  # the GEMM scan alone over the batch: top k by the estimate, not exact
    candidates_mean: float  # candidates a query for the exact pass, over the batch
    candidates_max: int


def synthetic_index(clips: int, dim: int, others: int, dtype: torch.dtype, seed: int = 0) -> ClipIndex:
    """A ClipIndex of random clips whose modalities share a latent direction each (as a trained model's do)."""
    g = torch.Generator().manual_seed(seed)
    names = ["video", "audio", "subtitle", "depth"][:others]
    emb = {m: torch.empty(clips, dim, dtype=dtype) for m in names}
    basis = torch.empty(clips, others, dim, dtype=dtype)
    span_volume_sq = torch.empty(clips)
    for start in range(0, clips, _CHUNK):
        end = min(clips, start + _CHUNK)
        latent = torch.randn(end - start, dim, generator=g)
        vectors = [F.normalize(latent + 0.5 * torch.randn(end - start, dim, generator=g), dim=-1) for _ in names]
        q, vol_sq = orthonormal_span(*vectors)
        for m, v in zip(names, vectors, strict=True):
            emb[m][start:end] = v.to(dtype)
        basis[start:end] = q.to(dtype)
        span_volume_sq[start:end] = vol_sq.float()
    return ClipIndex(emb, basis, span_volume_sq)


def _queries(index: ClipIndex, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(index), (n,), generator=g)
    near = sum(e[rows].float() for e in index.embeddings.values())
    return F.normalize(near + 0.3 * torch.randn(near.shape, generator=g), dim=-1)


def _stored_bytes_per_clip(index: ClipIndex, sample: int = 10_000) -> float:
    """The Parquet index format's bytes per clip (one caption a clip, no thumbnail), from a shard of `sample` clips."""
    import pyarrow.parquet as pq

    from gram_ray.retrieval.index import shard_table

    n = min(sample, len(index))
    names = index.modalities
    columns = {
        "id": [f"clip{i:07d}" for i in range(n)],
        "captions": [["a caption of about ten words describing what the clip shows"]] * n,
        "caption_embeddings": [e[None].float().numpy() for e in index.embeddings[names[0]][:n]],
        "thumbnail": [None] * n,
        "video_path": [f"s3://bucket/videos/clip{i:07d}.mp4" for i in range(n)],
        "audio_path": [None] * n,
        "span_volume_sq": index.span_volume_sq[:n].numpy(),
        "basis": index.basis[:n].float().numpy(),
        **{m: index.embeddings[m][:n].float().numpy() for m in names},
    }
    dtype = str(index.basis.dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.parquet"
        pq.write_table(shard_table(columns, names, dtype, 0), path)
        return path.stat().st_size / n


def _scan_only(queries: torch.Tensor, index: ClipIndex, k: int) -> torch.Tensor:
    """The baseline exactness is measured against: each query's k lowest closed-form estimates, in the exact
    search's chunks (scan_rows: the same memory budget), merged as it merges its own running top k (merge_topk)."""
    rows, best = scan_rows(queries, index), None
    for start in range(0, len(index), rows):
        estimate = squared_volumes(
            queries, index.basis[start : start + rows], index.span_volume_sq[start : start + rows]
        )
        best = merge_topk(best, estimate, start, k, largest=False)
    return best[0]


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set (VmHWM), so that a later read is the peak since now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _timed(fn, device: str, reps: int) -> tuple[float, int | None]:
    """(median ms of reps runs after a warm-up, the peak extra memory of one run; None where it cannot be read)."""
    cuda = device.startswith("cuda")
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:  # the process's peak resident set since a reset, less what it held before: the search's own memory
        base = process_memory(os.getpid())["VmRSS"]
        if not _reset_peak_rss():
            return statistics.median(times), None
        fn()
        peak = max(process_memory(os.getpid())["VmHWM"] - base, 0)
    return statistics.median(times), peak


def bench_search(
    clips: int = 1_000_000,
    modalities: int = 3,
    dim: int = 512,
    dtypes: tuple[str, ...] = ("float16", "float32"),
    device: str = "cpu",
    top_k: int = 10,
    batch_queries: int = 1000,
    reps: int = 3,
    log=print,
) -> list[SearchBenchResult]:
    results = []
    for name in dtypes:
        dtype = getattr(torch, name)
        start = time.perf_counter()
        log(f"generating a {name} index of {clips:,} clips (k={modalities}, D={dim}) ...")
        host = synthetic_index(clips, dim, modalities - 1, dtype)
        stored = _stored_bytes_per_clip(host)
        index = host.to(device)
        del host
        log(f"  generated in {time.perf_counter() - start:.1f} s; searching on {device} ...")
        one = _queries(index, 1, seed=1).to(device)
        batch = _queries(index, batch_queries, seed=2).to(device)
        one_ms, _ = _timed(lambda one=one, index=index: search_clips(one, index, top_k), device, reps)
        log(f"  1 query: {one_ms:.1f} ms")
        batch_ms, peak = _timed(lambda batch=batch, index=index: search_clips(batch, index, top_k), device, reps)
        log(f"  {batch_queries} queries: {batch_ms:.1f} ms")
        scan_ms, _ = _timed(lambda batch=batch, index=index: _scan_only(batch, index, top_k), device, reps)
        counts = torch.tensor([len(c) for c in volume_candidates(batch, index, top_k)], dtype=torch.float64)
        log(f"  the GEMM scan alone: {scan_ms:.1f} ms; {counts.mean():.1f} candidates a query (max {counts.max():.0f})")
        volumes, found = search_clips(one, index, top_k)
        brute = gram_volume(one, *index.embeddings.values())[0]  # exact volumes of every clip's stored vectors
        want = brute.topk(top_k, largest=False)
        exact = bool(torch.allclose(brute[found[0]], want.values, rtol=1e-5, atol=1e-7))
        per_clip = sum(t.element_size() * t[0].numel() for t in (*index.embeddings.values(), index.basis)) + 4
        results.append(
            SearchBenchResult(
                name, clips, modalities, dim, device, round(one_ms, 2), batch_queries, round(batch_ms, 1),
                per_clip, round(stored, 1), peak, exact, round(scan_ms, 1), round(float(counts.mean()), 1),
                int(counts.max()),
            )
        )  # fmt: skip
        del index, one, batch, volumes, found, brute
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def search_table(results: list[SearchBenchResult], hardware: str) -> str:
    r0 = results[0]
    lines = [
        f"search by volume over {r0.clips:,} clips (k={r0.modalities}, D={r0.dim}) on {hardware}; exact top k "
        "(closed-form GEMM, then float64 on the candidates)",
        f"{'dtype':<8} {'1 query ms':>11} {f'{r0.batch_queries} queries ms':>17} {'search B/clip':>14} "
        f"{'stored B/clip':>14} {'peak extra MB':>14} {'= brute force':>14} {'scan alone ms':>14} "
        f"{'exact / scan':>13} {'candidates mean/max':>20}",
    ]
    for r in results:
        lines.append(
            f"{r.dtype:<8} {r.one_query_ms:>11.1f} {r.batch_ms:>17.1f} {r.search_bytes_per_clip:>14,} "
            f"{r.stored_bytes_per_clip:>14,.0f} {_mb(r.peak_search_bytes):>14} {'yes' if r.exact else 'NO':>14} "
            f"{r.scan_only_batch_ms:>14.1f} {r.batch_ms / r.scan_only_batch_ms:>12.2f}x "
            f"{f'{r.candidates_mean:.1f} / {r.candidates_max}':>20}"
        )
    lines.append(
        "scan alone: the same batch's top k by the closed-form estimate only (not exact): exact / scan is what "
        "the error bound and the float64 pass over its candidates cost"
    )
    return "\n".join(lines)


def as_json(results: list[SearchBenchResult], hardware: str) -> dict:
    return {"hardware": hardware, "threads": torch.get_num_threads(), "results": [asdict(r) for r in results]}

"""Exact top-k search by Gram volume (or cosine) over a collection of clips: a GEMM per chunk of the collection.

The volume is not an inner product, so inner-product ANN indexes do not serve it as they are. It has a closed
form that makes it one: for a query vector t and a clip whose other modalities span S (k-1 vectors), with Q an
orthonormal basis of S,

    vol(t, S)^2 = vol(S)^2 * (|t|^2 - |Q t|^2).

An index keeps each clip's Q and vol(S)^2 (`orthonormal_span`, computed once), so a batch of queries against a
chunk of clips is one GEMM [queries, D] x [D, chunk (k-1)], a sum of squares over the k-1 coordinates, and a
per-clip scale. Clip-to-caption search is the same formula with the roles swapped: the query clip brings its
basis, the captions are the vectors.

Exactness. The GEMM form loses digits when t lies almost in S (the best matches) and when the index is stored in
float16, so it only chooses candidates, and a bound decides how many: every estimate comes with an upper bound on
its error (`volume_error_bound`: the stored dtype's rounding of the basis and embeddings, and the GEMM's own), the
k-th smallest upper end (estimate + bound) is a volume the true top k cannot exceed, and every clip whose lower end
is below it is a candidate. The candidates are recomputed in float64 from the stored embeddings by Gram-Schmidt, as
`gram_volume` does, and ranked by that, so the top k equal brute force by `gram_volume` over the same embeddings,
ties aside, whatever the data: tested over 10,000 clips for 2, 3 and 4 modalities, and on clusters of
near-duplicate clips in float16 and float32, both directions. The scan itself is the estimate and a running top k
of it: it keeps each query's `k + max(3k, 128)` lowest estimates, and only those get their bound; a query where a
clip not kept could still be a candidate is scanned again for all of them. So exactness costs a wider top k and a
pass over a few hundred candidates a query, not a bound over the whole collection.

Memory. The collection is scanned in chunks sized so that the [queries, chunk, k-1] coordinates stay under
`chunk_bytes`; the running top candidates are all that is kept between chunks. Pure torch: runs on the GPU when
the tensors are there (the index is moved there chunk by chunk, or whole by the caller).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gram_ray.volume import DEFAULT_EPS, exact_squared_volumes, orthonormal_span

__all__ = [
    "ClipIndex",
    "search_clips",
    "search_captions",
    "squared_volumes",
    "merge_topk",
    "scan_rows",
    "volume_candidates",
    "volume_error_bound",
    "ErrorModel",
    "UNIT_ROUNDOFF",
    "DEFAULT_CHUNK_BYTES",
]

DEFAULT_CHUNK_BYTES = 256 * 2**20  # the [queries, chunk, k-1] float32 coordinates of one chunk
_EXACT_ROWS = 16384  # candidate tuples recomputed in float64 at a time: 16384 x k x D x 8 bytes


@dataclass
class ClipIndex:
    """The tensors search reads: N clips, each with its m = k-1 non-text embeddings, their span's orthonormal basis
    and the span's squared volume. Stored as float16 or float32; computed in float32 (float64 when stored so)."""

    embeddings: dict[str, torch.Tensor]  # modality -> [N, D], L2-normalised, in index order
    basis: torch.Tensor  # [N, m, D]
    span_volume_sq: torch.Tensor  # [N]

    @property
    def modalities(self) -> list[str]:
        return list(self.embeddings)

    def __len__(self) -> int:
        return self.basis.shape[0]

    def to(self, device: torch.device | str) -> ClipIndex:
        return ClipIndex(
            {m: e.to(device) for m, e in self.embeddings.items()},
            self.basis.to(device),
            self.span_volume_sq.to(device),
        )


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# A float16 index is multiplied in float16 (float32 accumulation, float16 products) where that is fast: always on
# a GPU, and on a CPU for a few queries (a matrix-vector product that only streams the index: half the bytes of
# float32). A CPU has no fast float16 GEMM for many queries (measured: 100 queries 3.8x slower than float32), so
# there the index is widened to float32 a chunk at a time. The candidates are recomputed exactly either way.
_HALF_GEMV_QUERIES = 16


def _half_gemm(basis: torch.Tensor, queries: int) -> bool:
    return basis.dtype == torch.float16 and (basis.is_cuda or queries <= _HALF_GEMV_QUERIES)


# Unit roundoff (half the gap between 1 and the next float) of the dtypes an index is stored or computed in.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


@dataclass(frozen=True)
class ErrorModel:
    """Where a GEMM estimate's error comes from, as relative roundings (see volume_error_bound).

    basis: the stored basis rows (and the query, when it is rounded to float16 for the product);
    coordinates: each computed coordinate Q_j . t, per unit |t|: the GEMM's accumulation over D (D times the
      accumulator's roundoff, the worst case) plus a float16 product's output rounding;
    sources: the stored embeddings the exact pass reads, against the float32 ones the basis was computed from;
    span: vol(S)^2 as stored (float32)."""

    m: int
    basis: float
    coordinates: float
    sources: float
    span: float = UNIT_ROUNDOFF[torch.float32]

    @staticmethod
    def of_index(basis: torch.Tensor, embeddings: torch.Tensor, queries: int) -> ErrorModel:
        m, dim = basis.shape[1:]
        compute = _compute_dtype(basis)
        half = _half_gemm(basis, queries)
        return ErrorModel(
            m=m,
            basis=UNIT_ROUNDOFF[basis.dtype] + (UNIT_ROUNDOFF[torch.float16] if half else 0.0),
            coordinates=dim * UNIT_ROUNDOFF[compute] + (UNIT_ROUNDOFF[torch.float16] if half else 0.0),
            sources=UNIT_ROUNDOFF[embeddings.dtype] if embeddings.dtype != compute else 0.0,
        )


def volume_error_bound(estimate: torch.Tensor, t_sq: torch.Tensor, span_volume_sq: torch.Tensor, e: ErrorModel):
    """An upper bound on |estimate - vol(t, S)^2| for squared_volumes' estimates, elementwise; t_sq is |t|^2 and
    span_volume_sq vol(S)^2, broadcast against estimate.

    The estimate is V (|t|^2 - |Q t|^2). Each coordinate Q_j . t is off by at most (basis + coordinates) |t| (the
    stored row's rounding, then the product's), so |Q t|^2 is off by at most 2 sqrt(m) c |t|^2 + m c^2 |t|^2, and
    |t|^2 by D u |t|^2, which `coordinates` covers; V's own rounding adds `span` of the estimate. The exact pass
    reads embeddings rounded apart from the basis (a float16 index): moving each of the m vectors by at most
    `sources` of its (unit) length moves the volume by at most m sources |t| (a volume is linear in each vector,
    and the others span at most unit volume), so its square by 2 vol h + h^2. Twice the sum covers the
    second-order terms left out."""
    c = e.basis + e.coordinates
    coefficient = 2 * (2 * e.m**0.5 * c + e.m * c * c + e.coordinates)
    bound = (span_volume_sq * coefficient) * t_sq  # [Q, N] from [Q, 1] and [1, N] (or transposed)
    bound.add_(estimate, alpha=2 * e.span)
    if e.sources:  # in place: the bound is as large as the chunk's estimates
        h_sq = (e.m * e.sources) ** 2 * t_sq
        vol_sq_upper = (estimate + bound / 2).clamp_min_(0)
        bound.add_(vol_sq_upper.mul_(h_sq).sqrt_(), alpha=4).add_(2 * h_sq)
    return bound


def squared_volumes(vectors: torch.Tensor, basis: torch.Tensor, span_volume_sq: torch.Tensor) -> torch.Tensor:
    """[A, B]: vol(vectors[a], span b)^2 by the closed form. vectors [A, D]; basis [B, m, D] orthonormal rows;
    span_volume_sq [B]. One GEMM; the result in float32 at least."""
    dtype = _compute_dtype(basis)
    v = vectors.to(dtype)
    flat = basis.reshape(-1, basis.shape[-1])
    if _half_gemm(basis, v.shape[0]):
        coords = (v.half() @ flat.T).to(dtype)  # [A, B * m]
    else:
        coords = v @ flat.to(dtype).T
    # In place where the memory is: the [A, B * m] products are the chunk's largest buffer.
    inside = coords.square_().view(v.shape[0], basis.shape[0], basis.shape[1]).sum(-1)  # |Q_b v_a|^2
    residual = inside.neg_().add_((v * v).sum(-1, keepdim=True))  # |v_a|^2 - |Q_b v_a|^2
    return residual.clamp_min_(0).mul_(span_volume_sq.to(dtype)[None, :])


def _chunk_rows(queries: int, per_row_floats: int, chunk_bytes: int, widened_floats: int = 0) -> int:
    """Collection rows a chunk: its [queries, rows, per_row] float32 scores, plus the rows' widened copy (a float16
    index is computed in float32) within chunk_bytes."""
    return max(1, chunk_bytes // max(1, (queries * per_row_floats + widened_floats) * 4))


def merge_topk(
    best: tuple[torch.Tensor, torch.Tensor] | None, scores: torch.Tensor, start: int, keep: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `keep` (scores, item indices) [Q, keep] per query of those so far (best, or None) and a chunk's
    scores [Q, C] of items start..start+C. The chunk's own top k comes first, so only [Q, 2 keep] are merged: the
    chunk is never copied, nor its indices made (a [Q, C] int64 tensor, twice the chunk's scores)."""
    top = scores.topk(min(keep, scores.shape[1]), dim=1, largest=largest)
    values, index = top.values, top.indices + start
    if best is not None:
        values, index = torch.cat([best[0], values], 1), torch.cat([best[1], index], 1)
        top = values.topk(min(keep, values.shape[1]), dim=1, largest=largest)
        values, index = top.values, index.gather(1, top.indices)
    return values, index


def _running_topk(
    score_chunk: Callable[[int, int], torch.Tensor], n: int, keep: int, rows: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `keep` of n candidates per query, scanning them `rows` at a time: score_chunk(start, end) -> [Q, end -
    start]. Returns (scores, indices) [Q, keep], best first."""
    best = None
    for start in range(0, n, rows):
        best = merge_topk(best, score_chunk(start, min(n, start + rows)), start, keep, largest)
    return best


def _kept(k: int) -> int:
    """Lowest estimates kept by the scan: enough for clusters of ~100 near-duplicate clips around the top k (a
    float16 index cannot tell them apart, so all of them are candidates) without a second scan."""
    return k + max(3 * k, 128)


# The error of an estimate, elementwise: bound(estimate [Q', C], queries [Q'] or None for all, items [Q', C] or
# [1, C]), the estimate made by one GEMM of Q' queries (estimate.shape[0]).
Bound = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def _beyond_kept(last: torch.Tensor, widest: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[Q]: a lower end (estimate - bound) that no item the scan did not keep goes below, per query; -inf where
    none can be given. last: each query's largest kept estimate, which every item not kept is at least;
    widest(x): the bound of an estimate x for the item with the largest bound factors (it bounds every item's).

    The bound is concave in the estimate (linear terms and the square root of one), so its slope beyond `last` is
    at most the secant slope over [last / 2, last]. Where that is below 1, estimate - bound only grows beyond
    `last`, and its value at `last` bounds every item not kept."""
    half = last / 2
    at_last, at_half = widest(last[:, None])[:, 0], widest(half[:, None])[:, 0]
    slope = (at_last - at_half) / (last - half)
    floor = last - at_last
    return torch.where((last > 0) & (slope < 1), floor, torch.full_like(floor, -float("inf")))


def _bounded_candidates(
    estimate_chunk: Callable[[int, int, torch.Tensor | None], torch.Tensor],
    bound: Bound,
    widest: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    k: int,
    rows: int,
) -> list[torch.Tensor]:
    """Each query's candidates for the exact top k: every item whose lower end (estimate - bound) is at most the
    k-th smallest upper end (estimate + bound) over all n items. estimate_chunk(start, end, queries) -> the
    estimates [Q', end - start] of those queries (None: all).

    The scan is the estimate and a running top-k of it, as a scan without the bound is: the bound is computed only
    for the _kept(k) lowest estimates of each query. Their k-th smallest upper end is at least the true threshold
    (a threshold over fewer items), so it keeps every true candidate; the items not kept are bounded all at once
    (_beyond_kept). A query where one of them could still be a candidate is scanned again, bound and all, for every
    item under its threshold. Returns a tensor of item indices per query."""
    kept, kept_index = _running_topk(lambda start, end: estimate_chunk(start, end, None), n, _kept(k), rows, False)
    error = bound(kept, None, kept_index)
    lower, threshold = kept - error, (kept + error).topk(k, dim=1, largest=False).values[:, -1]
    candidates = [row[low <= limit] for row, low, limit in zip(kept_index, lower, threshold, strict=True)]
    overflow = (
        (_beyond_kept(kept[:, -1], widest) <= threshold).nonzero().flatten().tolist() if kept.shape[1] < n else []
    )
    if overflow:  # an item the scan did not keep may be a candidate: every item under the threshold, found again
        queries = torch.tensor(overflow, device=threshold.device)
        found: list[list[torch.Tensor]] = [[] for _ in overflow]
        for start in range(0, n, rows):
            end = min(n, start + rows)
            estimate = estimate_chunk(start, end, queries)
            items = torch.arange(start, end, device=estimate.device)[None, :]
            hits = (estimate - bound(estimate, queries, items)) <= threshold[queries, None]
            for i in range(len(overflow)):
                found[i].append(hits[i].nonzero().flatten() + start)
        for i, q in enumerate(overflow):
            candidates[q] = torch.cat(found[i])
    return candidates


def search_clips(
    queries: torch.Tensor,
    index: ClipIndex,
    k: int,
    score: str = "volume",
    cosine_modality: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption (or any anchor) -> clips: (scores, indices) [Q, k], best first. queries [Q, D] on the index's device.

    score="volume": the exact Gram volume of the query with each clip's modalities (lower is better).
    score="cosine": the cosine with one modality (cosine_modality, default the first; higher is better)."""
    if queries.dim() != 2 or queries.shape[1] != index.basis.shape[-1]:
        raise ValueError(
            f"queries must be [Q, {index.basis.shape[-1]}] (the index's embedding size), got {tuple(queries.shape)}"
        )
    k = min(k, len(index))
    if score == "cosine":
        modality = cosine_modality or index.modalities[0]
        if modality not in index.embeddings:
            raise ValueError(f"no {modality!r} embeddings in this index; it has {index.modalities}")
        emb = index.embeddings[modality]
        q = queries.to(_compute_dtype(emb))
        rows = _chunk_rows(q.shape[0], 1, chunk_bytes, emb.shape[1] if emb.dtype != q.dtype else 0)
        return _running_topk(lambda s, e: q @ emb[s:e].to(q.dtype).T, len(index), k, rows, largest=True)
    if score != "volume":
        raise ValueError(f"score must be 'volume' or 'cosine', got {score!r}")
    candidates = volume_candidates(queries, index, k, chunk_bytes)
    return _exact_top(
        lambda q, c: torch.stack([index.embeddings[m][c] for m in index.modalities], -2),
        lambda q, c: queries[q],
        candidates,
        k,
        eps,
    )


def scan_rows(queries: torch.Tensor, index: ClipIndex, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Clips a chunk of the volume scan: its [queries, rows, m] float32 coordinates (and a float16 index's widened
    copy of the rows) within chunk_bytes."""
    m, dim = index.basis.shape[1:]
    widened = m * dim if index.basis.dtype == torch.float16 and not _half_gemm(index.basis, queries.shape[0]) else 0
    return _chunk_rows(queries.shape[0], m, chunk_bytes, widened)


def volume_candidates(
    queries: torch.Tensor, index: ClipIndex, k: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[torch.Tensor]:
    """Each query's candidates for its exact top k by volume (clip indices): every clip whose GEMM estimate, less
    its error bound, is at most the k-th smallest estimate plus bound."""
    rows = scan_rows(queries, index, chunk_bytes)
    first = index.embeddings[index.modalities[0]]
    t_sq = (queries.to(_compute_dtype(index.basis)) ** 2).sum(-1, keepdim=True)

    def chunk(start: int, end: int, q: torch.Tensor | None) -> torch.Tensor:
        vectors = queries if q is None else queries[q]
        return squared_volumes(vectors, index.basis[start:end], index.span_volume_sq[start:end])

    def model(estimate: torch.Tensor) -> ErrorModel:  # a float16 product for few queries
        return ErrorModel.of_index(index.basis, first, estimate.shape[0])

    def bound(estimate: torch.Tensor, q: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
        span = index.span_volume_sq[items].to(estimate.dtype)
        return volume_error_bound(estimate, t_sq if q is None else t_sq[q], span, model(estimate))

    largest_span = index.span_volume_sq.max().to(t_sq.dtype)

    def widest(estimate: torch.Tensor) -> torch.Tensor:  # [Q, 1] from the scan, so the model of all the queries
        return volume_error_bound(estimate, t_sq, largest_span, ErrorModel.of_index(index.basis, first, len(t_sq)))

    return _bounded_candidates(chunk, bound, widest, len(index), min(k, len(index)), rows)


def _exact_top(span_rows, anchor_rows, candidates: list[torch.Tensor], k: int, eps: float):
    """Each query's k best candidates by their exact volume: float64 Gram-Schmidt of the stored embeddings, as
    gram_volume refines. span_rows(q, c) [P, m, D] and anchor_rows(q, c) [P, D] for P (query, candidate) pairs,
    q and c [P]. Only real pairs are computed, _EXACT_ROWS at a time (a query's list padded to the longest would
    cost as much as a query with a cluster of near-duplicates); the volumes are then laid out per query, padded
    with +inf, for the top k."""
    counts = torch.tensor([len(c) for c in candidates])
    device = candidates[0].device
    items = torch.cat(candidates)
    queries = torch.repeat_interleave(torch.arange(len(candidates), device=device), counts.to(device))
    exact = torch.empty(len(items), dtype=torch.float64, device=device)
    for start in range(0, len(items), _EXACT_ROWS):
        q, c = queries[start : start + _EXACT_ROWS], items[start : start + _EXACT_ROWS]
        exact[start : start + len(c)] = exact_squared_volumes(span_rows(q, c), anchor_rows(q, c), eps)
    width = int(counts.max())
    slot = torch.arange(len(items), device=device) - torch.repeat_interleave(
        (torch.cumsum(counts, 0) - counts).to(device), counts.to(device)
    )  # each pair's place in its query's list
    table = torch.full((len(candidates), width), float("inf"), dtype=torch.float64, device=device)
    table[queries, slot] = exact.clamp_min(0).sqrt()
    padded = torch.zeros((len(candidates), width), dtype=items.dtype, device=device)
    padded[queries, slot] = items
    order = table.topk(k, dim=1, largest=False)
    return order.values, padded.gather(1, order.indices)


def search_captions(
    clip_embeddings: dict[str, torch.Tensor],
    captions: torch.Tensor,
    k: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip -> captions by volume: (volumes, caption indices) [Q, k], lowest first. clip_embeddings: modality ->
    [Q, D] (the query clips' own modalities); captions [T, D]."""
    others = list(clip_embeddings.values())
    basis, span_volume_sq = orthonormal_span(*others, eps=eps)
    basis, span_volume_sq = basis.to(captions.device), span_volume_sq.to(captions.device)
    if captions.dtype != torch.float64:
        basis, span_volume_sq = basis.float(), span_volume_sq.float()
    k = min(k, captions.shape[0])
    rows = _chunk_rows(basis.shape[0], basis.shape[1], chunk_bytes)
    # The captions are the vectors here, read as stored by both passes: only the basis and the GEMM round.
    model = ErrorModel(
        m=basis.shape[1],
        basis=UNIT_ROUNDOFF[basis.dtype],
        coordinates=basis.shape[2] * UNIT_ROUNDOFF[basis.dtype],
        sources=0.0,  # the basis comes from the query clip's stored embeddings, which the exact pass reads too
    )

    caption_sq = (captions.to(basis.dtype) ** 2).sum(-1)

    def chunk(start: int, end: int, q: torch.Tensor | None) -> torch.Tensor:
        b, v = (basis, span_volume_sq) if q is None else (basis[q], span_volume_sq[q])
        return squared_volumes(captions[start:end], b, v).T  # [Q', captions]

    def bound(estimate: torch.Tensor, q: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
        v = span_volume_sq if q is None else span_volume_sq[q]
        return volume_error_bound(estimate, caption_sq[items], v.to(estimate.dtype)[:, None], model)

    largest_sq = caption_sq.max()

    def widest(estimate: torch.Tensor) -> torch.Tensor:
        return volume_error_bound(estimate, largest_sq, span_volume_sq.to(estimate.dtype)[:, None], model)

    candidates = _bounded_candidates(chunk, bound, widest, captions.shape[0], k, rows)
    clips = torch.stack(others, 1)  # [Q, m, D]
    return _exact_top(lambda q, c: clips[q], lambda q, c: captions[c], candidates, k, eps)

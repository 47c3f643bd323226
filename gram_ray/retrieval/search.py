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
near-duplicate clips in float16 and float32, both directions. One scan keeps each query's `k + max(3k, 128)` lowest
lower ends; a query with more candidates than that under its threshold is scanned again for all of them.

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


def _running_topk(
    score_chunk: Callable[[int, int], torch.Tensor], n: int, keep: int, rows: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `keep` of n candidates per query, scanning them `rows` at a time: score_chunk(start, end) -> [Q, end -
    start]. Returns (scores, indices) [Q, keep], best first."""
    best_scores = best_index = None
    for start in range(0, n, rows):
        end = min(n, start + rows)
        scores = score_chunk(start, end)
        index = torch.arange(start, end, device=scores.device).expand_as(scores)
        if best_scores is not None:
            scores, index = torch.cat([best_scores, scores], 1), torch.cat([best_index, index], 1)
        top = scores.topk(min(keep, scores.shape[1]), dim=1, largest=largest)
        best_scores, best_index = top.values, index.gather(1, top.indices)
    return best_scores, best_index


def _kept(k: int) -> int:
    """Lowest lower ends kept in the first scan: enough for clusters of ~100 near-duplicate clips around the top k
    (a float16 index cannot tell them apart, so all of them are candidates) without a second scan."""
    return k + max(3 * k, 128)


def _bounded_candidates(
    estimate_chunk: Callable[[int, int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    n: int,
    k: int,
    rows: int,
) -> list[torch.Tensor]:
    """Each query's candidates for the exact top k: every item whose lower end (estimate - bound) is at most the
    k-th smallest upper end (estimate + bound) over all n items. estimate_chunk(start, end, queries) -> (estimate,
    bound) [Q', end - start] for those queries (None: all). One scan keeps the _kept(k) lowest lower ends and the k
    lowest upper ends; a query whose kept lower ends all fall under its threshold may have more, and is scanned
    again for every item under it. Returns a tensor of item indices per query."""
    keep = _kept(k)
    lower = lower_index = upper = None
    for start in range(0, n, rows):
        end = min(n, start + rows)
        estimate, bound = estimate_chunk(start, end, None)
        low, high = estimate - bound, estimate + bound
        index = torch.arange(start, end, device=estimate.device).expand_as(estimate)
        if lower is not None:
            low, index, high = (
                torch.cat([lower, low], 1),
                torch.cat([lower_index, index], 1),
                torch.cat([upper, high], 1),
            )
        top = low.topk(min(keep, low.shape[1]), dim=1, largest=False)
        lower, lower_index = top.values, index.gather(1, top.indices)
        upper = high.topk(min(k, high.shape[1]), dim=1, largest=False).values
    threshold = upper[:, -1]
    candidates = [row[values <= limit] for row, values, limit in zip(lower_index, lower, threshold, strict=True)]
    overflow = ((lower[:, -1] <= threshold) & (lower.shape[1] < n)).nonzero().flatten().tolist()
    if overflow:  # more candidates than kept: every item under the threshold, found by scanning again
        queries = torch.tensor(overflow, device=threshold.device)
        found: list[list[torch.Tensor]] = [[] for _ in overflow]
        for start in range(0, n, rows):
            end = min(n, start + rows)
            estimate, bound = estimate_chunk(start, end, queries)
            hits = (estimate - bound) <= threshold[queries, None]
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
        lambda q, c: queries[q, None, :].expand(-1, c.shape[1], -1),
        candidates,
        k,
        eps,
    )


def volume_candidates(
    queries: torch.Tensor, index: ClipIndex, k: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[torch.Tensor]:
    """Each query's candidates for its exact top k by volume (clip indices): every clip whose GEMM estimate, less
    its error bound, is at most the k-th smallest estimate plus bound."""
    m, dim = index.basis.shape[1:]
    widened = m * dim if index.basis.dtype == torch.float16 and not _half_gemm(index.basis, queries.shape[0]) else 0
    rows = _chunk_rows(queries.shape[0], m, chunk_bytes, widened)
    first = index.embeddings[index.modalities[0]]
    t_sq = (queries.to(_compute_dtype(index.basis)) ** 2).sum(-1, keepdim=True)

    def chunk(start: int, end: int, q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        vectors, sq = (queries, t_sq) if q is None else (queries[q], t_sq[q])
        span = index.span_volume_sq[start:end]
        estimate = squared_volumes(vectors, index.basis[start:end], span)
        model = ErrorModel.of_index(index.basis, first, len(vectors))  # a float16 product for few queries
        return estimate, volume_error_bound(estimate, sq, span.to(estimate.dtype)[None, :], model)

    return _bounded_candidates(chunk, len(index), min(k, len(index)), rows)


def _exact_top(span_rows, anchor_rows, candidates: list[torch.Tensor], k: int, eps: float):
    """Each query's k best candidates by their exact volume: float64 Gram-Schmidt of the stored embeddings, as
    gram_volume refines. span_rows(q, c) [Q', C, m, D] and anchor_rows(q, c) [Q', C, D] for queries q [Q'] and
    their candidates c [Q', C]. Queries go together, their candidate lists padded to the longest (the padding
    scored +inf), about _EXACT_ROWS tuples at a time."""
    values, found = [], []
    longest = max(len(c) for c in candidates)
    step = max(1, _EXACT_ROWS // longest)
    for start in range(0, len(candidates), step):
        group = candidates[start : start + step]
        width = max(len(c) for c in group)
        padded = torch.stack([torch.cat([c, c[:1].expand(width - len(c))]) for c in group])
        valid = torch.arange(width, device=padded.device)[None, :] < torch.tensor([len(c) for c in group])[:, None].to(
            padded.device
        )
        q = torch.arange(start, start + len(group), device=padded.device)
        exact = exact_squared_volumes(span_rows(q, padded), anchor_rows(q, padded), eps).clamp_min(0).sqrt()
        order = exact.masked_fill(~valid, float("inf")).topk(k, dim=1, largest=False)
        values.append(order.values)
        found.append(padded.gather(1, order.indices))
    return torch.cat(values), torch.cat(found)


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

    def chunk(start: int, end: int, q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, v = (basis, span_volume_sq) if q is None else (basis[q], span_volume_sq[q])
        vectors = captions[start:end]
        estimate = squared_volumes(vectors, b, v).T  # [Q', captions]
        t_sq = (vectors.to(estimate.dtype) ** 2).sum(-1)[None, :]
        return estimate, volume_error_bound(estimate, t_sq, v.to(estimate.dtype)[:, None], model)

    candidates = _bounded_candidates(chunk, captions.shape[0], k, rows)
    clips = torch.stack(others, 1)  # [Q, m, D]
    return _exact_top(
        lambda q, c: clips[q, None].expand(-1, c.shape[1], -1, -1), lambda q, c: captions[c], candidates, k, eps
    )

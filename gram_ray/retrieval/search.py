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
float16; so each query's best `k + max(k, 32)` candidates from the GEMM are recomputed in float64 from the
stored embeddings by Gram-Schmidt, as `gram_volume` does, and ranked by that. The top k then equal brute force by
`gram_volume` over the same embeddings, ties aside (tested over 10,000 clips for k = 2, 3 and 4 modalities).

Memory. The collection is scanned in chunks sized so that the [queries, chunk, k-1] coordinates stay under
`chunk_bytes`; the running top candidates are all that is kept between chunks. Pure torch: runs on the GPU when
the tensors are there (the index is moved there chunk by chunk, or whole by the caller).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gram_ray.volume import DEFAULT_EPS, exact_squared_volumes, orthonormal_span

__all__ = ["ClipIndex", "search_clips", "search_captions", "squared_volumes", "DEFAULT_CHUNK_BYTES"]

DEFAULT_CHUNK_BYTES = 256 * 2**20  # the [queries, chunk, k-1] float32 coordinates of one chunk


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


def _candidates(k: int) -> int:
    return k + max(k, 32)


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
    m, dim = index.basis.shape[1:]
    widened = m * dim if index.basis.dtype == torch.float16 and not _half_gemm(index.basis, queries.shape[0]) else 0
    rows = _chunk_rows(queries.shape[0], m, chunk_bytes, widened)

    def chunk(start: int, end: int) -> torch.Tensor:
        return squared_volumes(queries, index.basis[start:end], index.span_volume_sq[start:end])

    _, candidates = _running_topk(chunk, len(index), _candidates(k), rows, largest=False)
    return _exact_top(
        lambda q: torch.stack([index.embeddings[mod][candidates[q]] for mod in index.modalities], -2),
        lambda q: queries[q, None, :].expand(-1, candidates.shape[1], -1),
        candidates,
        k,
        eps,
        chunk_bytes,
    )


def _exact_top(span_rows, anchor_rows, candidates: torch.Tensor, k: int, eps: float, chunk_bytes: int):
    """Each query's k best candidates by their exact volume: float64 Gram-Schmidt of the stored embeddings, as
    gram_volume refines. span_rows(q) [Q', c, m, D] and anchor_rows(q) [Q', c, D] for a slice q of the queries,
    taken a few queries at a time so that the float64 tuples (and their temporaries) stay within chunk_bytes."""
    n, c = candidates.shape
    _, _, m, dim = span_rows(slice(0, 1)).shape
    per_query = 4 * c * (m + 1) * dim * 8
    step = max(1, chunk_bytes // per_query)
    values, found = [], []
    for start in range(0, n, step):
        q = slice(start, start + step)
        exact = exact_squared_volumes(span_rows(q), anchor_rows(q), eps).clamp_min(0).sqrt()
        order = exact.topk(k, dim=1, largest=False)
        values.append(order.values)
        found.append(candidates[q].gather(1, order.indices))
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
    _, candidates = _running_topk(
        lambda s, e: squared_volumes(captions[s:e], basis, span_volume_sq).T,
        captions.shape[0],
        _candidates(k),
        rows,
        largest=False,
    )
    clips = torch.stack(others, 1)  # [Q, m, D]
    return _exact_top(
        lambda q: clips[q, None].expand(-1, candidates.shape[1], -1, -1),
        lambda q: captions[candidates[q]],
        candidates,
        k,
        eps,
        chunk_bytes,
    )

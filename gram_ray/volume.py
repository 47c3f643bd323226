"""Gram volumes: the size of the parallelotope that k modality vectors span.

GRAM scores a caption against a clip by vol(a, s_1, ..., s_{k-1}) = sqrt(det G), G the k x k Gram matrix of
the anchor a (the caption) and the clip's other modality vectors s_m. Small volume = well aligned.

The all-pairs volume never builds the B1 x B2 x k x k Gram tensor the paper's code builds. With S_j the other
modalities of sample j and Q_j an orthonormal basis of their span,

    det G(a, S_j) = det G(S_j) * |a - Q_j^T Q_j a|^2 = vol(S_j)^2 * (|a|^2 - |Q_j a|^2),   Q_j a = L_j^{-1} S_j a,

with L_j the Cholesky factor of the clip's own (k-1) x (k-1) Gram matrix. So each sample's small Gram matrix
is factorised once (O(B2 k^2 D)), then k-1 GEMMs [B1, D] x [D, B2] and one fused elementwise pass give every
pair: the cost and memory of a cosine similarity matrix times (k-1).

Accuracy. The subtraction |a|^2 - |Q_j a|^2 cancels when a lies almost in span(S_j), which is exactly what a
positive pair of a trained model looks like. Pairs whose residual is below `REFINE_RTOL[dtype] * |a|^2` are
recomputed in float64 from their input rows by Gram-Schmidt (a few per row in practice; chunked, so memory
stays bounded), so the result agrees with a float64 determinant to ~1e-9 (float64 inputs) or ~1e-5 (float32
inputs) even there. Clips whose own k-1 vectors are nearly dependent (a degenerate span) are recomputed the
same way. Two ways to pick the pairs:
- `refine=None` (default): every flagged pair, found with nonzero(): exact always, at one host sync per call.
- `refine=m`: the m pairs of each row with the smallest relative residual (flagged or not; degenerate spans
  first), by topk: static shapes and no host sync, so torch.compile and CUDA graphs can take the whole loss.
  In contrastive training a row's flagged pairs are its positive and near-duplicates, so a small m covers them;
  flagged pairs beyond the budget keep their GEMM value and are counted on the device (`stats`), never synced.

Autocast. The volume is computed in float32 (or float64) even inside a bf16/fp16 autocast region: the GEMMs
here would otherwise run in half precision, where the subtraction above loses every digit.

Zero volume. Positives of a well-trained model have volume near 0, where d sqrt(x)/dx is unbounded. The
forward value is the exact sqrt; the backward evaluates 1 / (2 vol) with vol floored at `eps` (default 1e-6),
so the gradient at or near zero volume is bounded by 1 / (2 eps) times the incoming gradient and never
inf or NaN. Exactly dependent spans (two other modalities collinear) contribute a zero factor to the volume,
and their Cholesky pivot / Gram-Schmidt norm is floored at eps^2 / eps so the basis stays finite.
"""

from __future__ import annotations

import torch

__all__ = [
    "gram_volume",
    "aligned_volume",
    "orthonormal_span",
    "exact_squared_volumes",
    "safe_sqrt",
    "validate_modalities",
    "DEFAULT_EPS",
]

DEFAULT_EPS = 1e-6

# Relative residual |a - P a|^2 / |a|^2 below which the GEMM form loses digits to cancellation and the pair is
# recomputed in float64 (float32's threshold also marks a clip's span as degenerate). Rounding in |a|^2 and in
# the GEMM is ~sqrt(D) * unit roundoff of |a|^2; these thresholds keep that below ~1e-5 (float32) and ~1e-10
# (float64) of the residual on the GEMM path.
REFINE_RTOL = {torch.float32: 5e-2, torch.float64: 1e-5}

# Pairs recomputed per float64 chunk: bounds the refinement's memory at chunk * k * D * 8 bytes.
_REFINE_CHUNK = 16384


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Half inputs are computed in float32: bf16/fp16 determinants are meaningless at these magnitudes.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def validate_modalities(anchor: torch.Tensor, others: tuple[torch.Tensor, ...], *, aligned: bool) -> None:
    """Raise ValueError naming the problem unless anchor and others can form Gram volumes.
    aligned=True: every tensor has the same batch size (tuples); False: others share one batch size (pairs)."""
    if len(others) < 1:
        raise ValueError(
            f"a Gram volume needs k >= 2 vectors per sample: got the anchor and {len(others)} other modalities; "
            "pass at least one other modality (e.g. gram_volume(text, video, audio))"
        )
    tensors = (anchor, *others)
    for idx, t in enumerate(tensors):
        name = "anchor" if idx == 0 else f"others[{idx - 1}]"
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(
                f"{name} has dtype {t.dtype}; Gram volumes need floating-point embeddings (cast with .float())"
            )
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(t.shape)}")
        if t.device != anchor.device:
            raise ValueError(f"{name} is on {t.device} but the anchor is on {anchor.device}; move them together")
    dim = anchor.shape[1]
    bad_dims = [f"others[{m}]: {o.shape[1]}" for m, o in enumerate(others) if o.shape[1] != dim]
    if bad_dims:
        raise ValueError(
            f"all modalities must share the feature dimension of the anchor ({dim}); got {', '.join(bad_dims)}. "
            "Project them to a common dimension first"
        )
    ref = anchor.shape[0] if aligned else others[0].shape[0]
    what = "the anchor" if aligned else "others[0]"
    bad_rows = [f"others[{m}]: {o.shape[0]}" for m, o in enumerate(others) if o.shape[0] != ref]
    if bad_rows:
        raise ValueError(
            f"the other modalities must have the same batch size as {what} ({ref}), since row j of each belongs "
            f"to sample j; got {', '.join(bad_rows)}"
        )


def _gram_schmidt(vectors: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormalise each sample's vectors.

    vectors: [N, m, D] (m vectors per sample). Returns (basis [N, m, D], residual_sq [N, m]) where residual_sq[:, i]
    is the squared norm of vector i after removing its components along vectors 0..i-1; their product is the
    squared volume (the Gram determinant) of the m vectors. Modified Gram-Schmidt, each projection applied twice
    ("twice is enough") so the basis stays orthonormal to working precision even for nearly dependent vectors.
    """
    basis: list[torch.Tensor] = []
    residual_sq: list[torch.Tensor] = []
    for i in range(vectors.shape[1]):
        v = vectors[:, i]
        for _ in range(2):
            for q in basis:  # v - (v . q) q, fused: no [N, D] temporaries (a quarter faster, bound by memory)
                v = torch.addcmul(v, q, torch.linalg.vecdot(v, q).unsqueeze(-1), value=-1)
        n2 = torch.linalg.vecdot(v, v)
        residual_sq.append(n2)
        # A zero residual (dependent vectors) makes the volume 0 through n2; the floor keeps its direction finite.
        basis.append(v * torch.rsqrt(n2.clamp_min(floor * floor)).unsqueeze(-1))
    return torch.stack(basis, 1), torch.stack(residual_sq, 1)


def _squared_volume_aligned(vectors: torch.Tensor, floor: float) -> torch.Tensor:
    """det of the Gram matrix of each sample's vectors; vectors [N, k, D] -> [N]."""
    return _gram_schmidt(vectors, floor)[1].prod(-1)


class _SafeSqrt(torch.autograd.Function):
    """sqrt with an exact forward value and a backward bounded at zero (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        y = x.clamp_min(0).sqrt()
        ctx.save_for_backward(y)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        return grad / (2 * y.clamp_min(ctx.eps)), None


def safe_sqrt(x: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    return _SafeSqrt.apply(x, eps)


class _PairVolume(torch.autograd.Function):
    """vol_ij = sqrt(span_vol_sq_j * (anchor_sq_i - |W_j P_.,ij|^2)), P_m = anchor @ other_m^T, in few passes
    over [B1, B2].

    Written out because autograd would keep and revisit a [B1, B2] intermediate for every elementary op; this
    keeps the projections (alive anyway) and the residual. Pairs whose residual is near or below zero are always
    refined afterwards (their entries replaced, gradient included), so the clamp needs no special backward.
    """

    @staticmethod
    def _coordinates(whitening: torch.Tensor, projections) -> list[torch.Tensor]:
        # c_t = sum_{m <= t} W_tm P_m: the anchor's coordinates in the orthonormal basis of each clip's span.
        coords = []
        for t in range(len(projections)):
            c = projections[0] * whitening[None, :, t, 0]
            for m in range(1, t + 1):
                c.addcmul_(projections[m], whitening[None, :, t, m])
            coords.append(c)
        return coords

    @staticmethod
    def forward(ctx, anchor_sq, span_vol_sq, whitening, eps, *projections):
        residual = anchor_sq[:, None].expand_as(projections[0]).clone()
        for c in _PairVolume._coordinates(whitening, projections):
            residual.addcmul_(c, c, value=-1)
        ctx.save_for_backward(anchor_sq, span_vol_sq, whitening, residual, *projections)
        ctx.eps = eps
        return (residual.clamp_min(0) * span_vol_sq[None, :]).sqrt_(), residual

    @staticmethod
    def backward(ctx, grad, _grad_residual):
        anchor_sq, span_vol_sq, whitening, residual, *projections = ctx.saved_tensors
        vol = (residual.clamp_min(0) * span_vol_sq[None, :]).sqrt_()
        half_over_vol = grad / vol.clamp_min_(ctx.eps).mul_(2)
        grad_span_vol_sq = (half_over_vol * residual).sum(0)
        weighted = half_over_vol.mul_(span_vol_sq[None, :])  # d vol / d residual
        grad_anchor_sq = weighted.sum(1)
        grad_whitening = torch.zeros_like(whitening)
        grad_projections = [torch.zeros_like(p) for p in projections]
        for t, c in enumerate(_PairVolume._coordinates(whitening, projections)):
            grad_c = c.mul_(weighted).mul_(-2)
            for m in range(t + 1):
                grad_projections[m].addcmul_(grad_c, whitening[None, :, t, m])
                grad_whitening[:, t, m] = (grad_c * projections[m]).sum(0)
        return grad_anchor_sq, grad_span_vol_sq, grad_whitening, None, *grad_projections


def _pair_volume_traced(anchor_sq, span_vol_sq, whitening, eps, *projections):
    """_PairVolume in plain differentiable ops, for torch.compile: traced through AOTAutograd the hand-written
    backward (in-place updates on recomputed coordinates) gave wrong gradients, and under compile the
    elementwise chain is fused anyway, so autograd's intermediates cost little."""
    residual = anchor_sq[:, None]
    for t in range(len(projections)):
        c = sum(projections[m] * whitening[None, :, t, m] for m in range(t + 1))
        residual = residual - c * c
    return safe_sqrt(residual.clamp_min(0) * span_vol_sq[None, :], eps), residual.detach()


def aligned_volume(*modalities: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Volume of aligned tuples: modalities are k >= 2 tensors [B, D]; returns [B] with entry j the volume spanned
    by the j-th row of every modality (e.g. the positive pairs, for logging the mean positive volume)."""
    if not modalities:
        raise ValueError("aligned_volume needs at least two modalities, got none")
    validate_modalities(modalities[0], modalities[1:], aligned=True)
    dtype = _compute_dtype(modalities[0])
    stacked = torch.stack([m.to(dtype) for m in modalities], 1)
    return safe_sqrt(_squared_volume_aligned(stacked, eps), eps)


def orthonormal_span(*vectors: torch.Tensor, eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's span, once: vectors are m >= 1 tensors [N, D] (row j of each belongs to sample j). Returns
    (Q [N, m, D], vol^2 [N]): an orthonormal basis of every sample's span and the squared volume of its m vectors,
    computed in float64 (a search index keeps them, so that vol(a, S)^2 = vol^2 (|a|^2 - |Q a|^2) is one GEMM).
    A dependent span has volume 0 and a basis kept finite by the eps floor."""
    if not vectors:
        raise ValueError("orthonormal_span needs at least one [N, D] tensor")
    if len(vectors) > 1:
        validate_modalities(vectors[0], vectors[1:], aligned=True)
    basis, residual_sq = _gram_schmidt(torch.stack([v.to(torch.float64) for v in vectors], 1), eps)
    return basis, residual_sq.prod(-1)


def _span_whitening(span: list[torch.Tensor], floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample whitening of the span from its small Gram matrix.

    span: m tensors [N, D]. With C = S S^T = L L^T ([N, m, m], Cholesky), W = L^{-1} maps the raw projections
    S a to coordinates in an orthonormal basis of span(S): |Q a|^2 = |W S a|^2, and vol(S)^2 = det C = the
    product of the pivots. Only the m(m+1)/2 Gram entries touch [N, D]; everything else is on [N]-sized
    scalars. The factorisation is written out so a (near-)dependent span floors its pivot instead of failing
    as torch.linalg.cholesky would.
    Returns (W [N, m, m] lower triangular, span volume squared [N], degenerate [N] bool: a pivot lost most of
    its digits to cancellation, so every pair with that sample is recomputed in float64).
    """
    m = len(span)
    gram = [[(span[i] * span[j]).sum(-1) for j in range(i + 1)] for i in range(m)]
    lower: list[list[torch.Tensor]] = []  # lower[i][j] = L_ij, j <= i
    pivots = []
    degenerate = torch.zeros(span[0].shape[0], dtype=torch.bool, device=span[0].device)
    for i in range(m):
        row = []
        for j in range(i):
            row.append((gram[i][j] - sum(lower[j][t] * row[t] for t in range(j))) / lower[j][j])
        pivot = gram[i][i] - sum(x * x for x in row)
        pivots.append(pivot.clamp_min(0))
        degenerate |= pivot <= REFINE_RTOL[torch.float32] * gram[i][i]
        row.append(pivot.clamp_min(floor * floor).sqrt())
        lower.append(row)
    # W = L^{-1} by forward substitution: W_ij = -(sum_{j<=t<i} L_it W_tj) / L_ii, W_ii = 1 / L_ii.
    zero = torch.zeros_like(gram[0][0])
    inverse: list[list[torch.Tensor]] = []
    for i in range(m):
        row = [-sum(lower[i][t] * inverse[t][j] for t in range(j, i)) / lower[i][i] for j in range(i)]
        row.append(1 / lower[i][i])
        inverse.append(row + [zero] * (m - 1 - i))
    whitening = torch.stack([torch.stack(r, -1) for r in inverse], -2)
    return whitening, torch.stack(pivots, -1).prod(-1), degenerate


def gram_volume(
    anchor: torch.Tensor,
    *others: torch.Tensor,
    eps: float = DEFAULT_EPS,
    refine: int | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """All-pairs Gram volume.

    anchor: [B1, D]; each of others: [B2, D], row j of every other tensor belonging to sample j.
    Returns [B1, B2]: entry (i, j) is sqrt(det G) for the k = 1 + len(others) vectors anchor[i], others[0][j], ...
    Computed in the input dtype, at least float32 (half inputs give a float32 result); exact to ~1e-9 relative
    for float64 inputs and ~1e-5 for float32, including near-zero volumes (see the module docstring).
    refine: None refines every flagged pair (one host sync); an int m refines each row's m most cancelling
    pairs with static shapes (no sync; torch.compile-friendly). stats, if given, receives on-device counts:
    "refine_flagged" (pairs the GEMM form cannot be trusted with) and "refine_overflow" (of those, left
    unrefined because a row had more than m).
    """
    validate_modalities(anchor, others, aligned=False)
    if refine is not None and refine < 1:
        raise ValueError(
            f"refine must be None (every flagged pair) or a positive number of pairs per row, got {refine}"
        )
    with torch.autocast(anchor.device.type, enabled=False):
        dtype = _compute_dtype(anchor)
        a = anchor.to(dtype)
        span = [o.to(dtype) for o in others]
        whitening, span_vol_sq, degenerate_span = _span_whitening(span, eps)

        anchor_sq = (a * a).sum(-1)  # [B1]
        # Raw projections S_j a_i: one [B1, D] x [D, B2] GEMM per other modality.
        pair_volume = _pair_volume_traced if torch.compiler.is_compiling() else _PairVolume.apply
        volume, residual_sq = pair_volume(anchor_sq, span_vol_sq, whitening, eps, *(a @ o.T for o in span))

        with torch.no_grad():
            relative = residual_sq / anchor_sq.clamp_min(torch.finfo(dtype).tiny)[:, None]
            cancelled = (relative <= REFINE_RTOL[dtype]) | degenerate_span[None, :]
        if refine is None:
            return _refine(volume, cancelled, a, span, eps)
        return _refine_static(volume, cancelled, relative, degenerate_span, a, span, eps, refine, stats)


def exact_squared_volumes(span_rows: torch.Tensor, anchor_rows: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 Gram-Schmidt volumes of tuples: span_rows [..., k-1, D], anchor_rows [..., D] -> [...]. The anchor
    goes last, so its residual is its distance from the clip's span, taken after that span is orthonormalised
    twice; the earlier residuals give the span's own volume."""
    tuples = torch.cat([span_rows, anchor_rows.unsqueeze(-2)], -2).to(torch.float64)
    shape = tuples.shape[:-2]
    return _squared_volume_aligned(tuples.reshape(-1, *tuples.shape[-2:]), eps).reshape(shape)


def _refine(volume: torch.Tensor, pairs: torch.Tensor, anchor: torch.Tensor, span: list[torch.Tensor], eps: float):
    """Recompute the flagged pairs' volumes in float64 by Gram-Schmidt on their own k vectors."""
    index = pairs.nonzero()
    if index.numel() == 0:
        return volume
    span = torch.stack(span, 1)  # [B2, k-1, D]
    exact = [exact_squared_volumes(span[chunk[:, 1]], anchor[chunk[:, 0]], eps) for chunk in index.split(_REFINE_CHUNK)]
    exact_volume = safe_sqrt(torch.cat(exact), eps).to(volume.dtype)
    return volume.index_put((index[:, 0], index[:, 1]), exact_volume)


def _refine_static(volume, cancelled, relative, degenerate_span, anchor, span, eps, per_row: int, stats):
    """Recompute, in float64, each row's per_row pairs with the smallest relative residual (degenerate spans
    first): fixed shapes, no data-dependent control flow."""
    per_row = min(per_row, volume.shape[1])
    with torch.no_grad():
        priority = relative.masked_fill(degenerate_span[None, :], float("-inf"))
        columns = priority.topk(per_row, dim=1, largest=False).indices  # [B1, m]
        if stats is not None:
            flagged = cancelled.sum(1)
            stats["refine_flagged"] = flagged.sum()
            stats["refine_overflow"] = (flagged - per_row).clamp_min(0).sum()
    span_rows = torch.stack(span, 1)[columns]  # [B1, m, k-1, D]
    anchor_rows = anchor[:, None].expand(-1, per_row, -1)
    exact_volume = safe_sqrt(exact_squared_volumes(span_rows, anchor_rows, eps), eps).to(volume.dtype)
    return volume.scatter(1, columns, exact_volume)

"""Reference implementations the tests compare against: slow, obviously correct."""

import mpmath
import torch


def det_volume(anchor: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """All-pairs volume from the float64 determinant of each pair's explicit k x k Gram matrix."""
    a = anchor.double()
    o = [x.double() for x in others]
    b1, b2 = a.shape[0], o[0].shape[0]
    vectors = torch.stack([a[:, None].expand(b1, b2, -1)] + [x[None].expand(b1, b2, -1) for x in o], 2)
    gram = vectors @ vectors.transpose(-1, -2)
    return torch.linalg.det(gram).clamp_min(0).sqrt()


def mp_volume(vectors: list[torch.Tensor], digits: int = 50) -> float:
    """Volume of one tuple in 50-digit arithmetic: the reference where a float64 det is ill-conditioned."""
    mpmath.mp.dps = digits
    m = mpmath.matrix([[mpmath.mpf(float(x)) for x in v.double()] for v in vectors])
    return float(mpmath.sqrt(mpmath.det(m * m.T)))

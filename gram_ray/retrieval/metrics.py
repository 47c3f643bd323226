"""Retrieval evaluation: R@1/5/10, MedR and MeanR, by volume and by cosine, both directions. Pure numpy/torch:
embedding a dataset with a checkpoint (Ray Data batch inference) lives in retrieval/inference.py, and embedding
with the model being trained in retrieval/embedding.py.

Metrics JSON (DESIGN.md): {"volume": {"text-video-audio": {"t2v": {...}, "v2t": {...}}, ...},
"cosine": {"text-video": {...}, ...}}. R@K in percent, ranks 1-based. Volume scores: lower is better.
With several captions per video, `text_to_video[i]` is the video index of caption i; v2t ranks, for each video,
its best-ranked matching caption.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gram_ray.storage import CorruptFileError
from gram_ray.volume import gram_volume

__all__ = [
    "retrieval_metrics",
    "rank_metrics",
    "evaluate_embeddings",
    "load_embedding_dir",
    "volume_scores",
    "write_metrics",
    "results_table",
]

_CHUNK = 1024


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    return {
        "R@1": float(100 * np.mean(ranks <= 1)),
        "R@5": float(100 * np.mean(ranks <= 5)),
        "R@10": float(100 * np.mean(ranks <= 10)),
        "MedR": float(np.median(ranks)),
        "MeanR": float(np.mean(ranks)),
    }


def retrieval_metrics(scores: torch.Tensor, text_to_video: np.ndarray, higher_is_better: bool) -> dict:
    """scores [n_text, n_video]; ranks count the candidates strictly better than the true match, plus one."""
    s = scores if higher_is_better else -scores
    match = torch.as_tensor(text_to_video, device=s.device, dtype=torch.long)
    true = s.gather(1, match[:, None])  # [n_text, 1]
    t2v_ranks = (s > true).sum(1) + 1
    # v2t: for video j, the rank of caption i among all captions = 1 + #captions scoring higher for video j.
    caption_ranks = (s[:, match] > true.T).sum(0) + 1  # column i: every caption scored against caption i's video
    v2t = torch.full((s.shape[1],), torch.iinfo(torch.long).max, dtype=torch.long, device=s.device)
    v2t = v2t.scatter_reduce(0, match, caption_ranks, reduce="amin")
    v2t = v2t[v2t != torch.iinfo(torch.long).max]  # videos without a caption are not scored
    return {"t2v": rank_metrics(t2v_ranks.cpu().numpy()), "v2t": rank_metrics(v2t.cpu().numpy())}


def volume_scores(text: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """[n_text, n_video] volumes, computed in chunks of captions to bound memory."""
    with torch.no_grad():
        return torch.cat([gram_volume(chunk, *others) for chunk in text.split(_CHUNK)])


def evaluate_embeddings(
    embeddings: dict[str, torch.Tensor | np.ndarray],
    text_to_video: np.ndarray | None = None,
    anchor: str = "text",
    max_volume_set: int | None = None,
) -> dict:
    """All metrics for an anchor (captions) against every other modality (one row per video).

    volume: the anchor with every non-empty set of the other modalities (text-video, text-video-audio, ...);
    cosine: the anchor with each other modality."""
    emb = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in embeddings.items()}
    if anchor not in emb:
        raise ValueError(f"no {anchor!r} embeddings among {sorted(emb)}")
    canonical = ["video", "audio", "subtitles", "subtitle", "depth"]
    others = sorted((k for k in emb if k != anchor), key=lambda k: (canonical.index(k) if k in canonical else 99, k))
    if not others:
        raise ValueError(f"need at least one modality besides {anchor!r}, got only {sorted(emb)}")
    n_video = emb[others[0]].shape[0]
    bad = [f"{k}: {v.shape[0]}" for k, v in emb.items() if k != anchor and v.shape[0] != n_video]
    if bad:
        raise ValueError(f"every non-anchor modality needs one row per video ({n_video}); got {', '.join(bad)}")
    if text_to_video is None:
        if emb[anchor].shape[0] != n_video:
            raise ValueError(
                f"{emb[anchor].shape[0]} {anchor} rows but {n_video} videos: pass text_to_video (caption -> video)"
            )
        text_to_video = np.arange(n_video)
    text = emb[anchor]
    result: dict[str, dict] = {"volume": {}, "cosine": {}}
    largest = len(others) if max_volume_set is None else max_volume_set
    for size in range(1, largest + 1):
        for combo in itertools.combinations(others, size):
            name = "-".join((anchor, *combo))
            scores = volume_scores(text, [emb[m] for m in combo])
            result["volume"][name] = retrieval_metrics(scores, text_to_video, higher_is_better=False)
    for m in others:
        a = torch.nn.functional.normalize(text, dim=-1)
        b = torch.nn.functional.normalize(emb[m], dim=-1)
        result["cosine"][f"{anchor}-{m}"] = retrieval_metrics(a @ b.T, text_to_video, higher_is_better=True)
    return result


def load_embedding_dir(directory: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """<modality>.npy files (row i of each is the same sample) and optional text_to_video.npy (int, one per
    caption row) when there are several captions per video."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory of <modality>.npy files")
    files = sorted(p for p in directory.glob("*.npy") if p.stem != "text_to_video")
    if not files:
        raise ValueError(f"no <modality>.npy files in {directory}")
    emb = {p.stem: _load_npy(p) for p in files}
    mapping = directory / "text_to_video.npy"
    return emb, (_load_npy(mapping).astype(np.int64) if mapping.exists() else None)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path)  # allow_pickle=False: an array file, never code
    except (ValueError, OSError) as e:
        raise CorruptFileError(f"{path} is not a numpy array file ({str(e).splitlines()[0][:120]})") from None


def write_metrics(metrics: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(metrics, indent=2))


def results_table(evaluation: dict) -> str:
    """The metrics JSON as a console table: a row per score and modality set (t2v R@1/5/10, MedR, v2t R@1)."""
    w = max([5, *(len(kind) for kind in evaluation)])
    lines = [f"{'score':<{w}} {'modalities':<28} {'t2v R@1':>8} {'R@5':>6} {'R@10':>6} {'MedR':>6} {'v2t R@1':>8}"]
    for kind, by_name in evaluation.items():
        for name, d in by_name.items():
            t, v = d["t2v"], d["v2t"]
            recalls = f"{t['R@1']:>8.1f} {t['R@5']:>6.1f} {t['R@10']:>6.1f} {t['MedR']:>6.1f}"
            lines.append(f"{kind:<{w}} {name:<28} {recalls} {v['R@1']:>8.1f}")
    return "\n".join(lines)

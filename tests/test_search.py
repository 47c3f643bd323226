"""Search by volume: the closed form's top-k equals brute force by gram_volume (the training and evaluation
volume), in both directions, for 2, 3 and 4 modalities, from float32 and float16 indexes."""

import pytest
import torch
import torch.nn.functional as F

from gram_ray.retrieval.search import (
    ClipIndex,
    ErrorModel,
    _beyond_kept,
    _kept,
    search_captions,
    search_clips,
    squared_volumes,
    volume_candidates,
    volume_error_bound,
)
from gram_ray.volume import gram_volume, orthonormal_span

CLIPS, DIM = 10_000, 64


def _aligned_collection(n: int, modalities: int, seed: int = 0):
    """Clips whose modalities share a latent direction with their caption (so some volumes are near 0, where the
    GEMM form cancels) plus noise; the queries are captions of 40 of the clips."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, DIM, generator=g)
    clip = [F.normalize(latent + 0.3 * torch.randn(n, DIM, generator=g), dim=-1) for _ in range(modalities)]
    picked = torch.randperm(n, generator=g)[:40]
    queries = F.normalize(latent[picked] + 0.2 * torch.randn(40, DIM, generator=g), dim=-1)
    return clip, queries


def _index(clip: list[torch.Tensor], dtype=torch.float32) -> ClipIndex:
    basis, vol_sq = orthonormal_span(*clip)
    names = ["video", "audio", "subtitle"][: len(clip)]
    return ClipIndex({m: e.to(dtype) for m, e in zip(names, clip, strict=False)}, basis.to(dtype), vol_sq.float())


def _assert_same_topk(got_scores, got_index, brute: torch.Tensor, k: int):
    """Same top k as brute force, ties aside: the volumes agree to ~1e-6, and every returned index has the brute
    force volume of the slot it fills (so two clips of equal volume may swap)."""
    want = brute.topk(k, dim=1, largest=False)
    torch.testing.assert_close(got_scores.double(), want.values.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(brute.gather(1, got_index).double(), want.values.double(), rtol=1e-5, atol=1e-7)
    assert (got_index == want.indices).float().mean() > 0.99


@pytest.mark.parametrize("modalities", [1, 2, 3])
def test_search_clips_equals_brute_force_over_10k_clips(modalities):
    clip, queries = _aligned_collection(CLIPS, modalities)
    index = _index(clip)
    brute = gram_volume(queries, *clip)
    scores, found = search_clips(queries, index, k=10, chunk_bytes=2**20)  # ~30 chunks: the merge is exercised
    _assert_same_topk(scores, found, brute, 10)
    assert brute.min() < 0.35  # the near-aligned regime where the GEMM form alone would lose digits


@pytest.mark.parametrize("modalities", [1, 2, 3])
def test_search_captions_equals_brute_force(modalities):
    clip, captions = _aligned_collection(CLIPS, modalities, seed=1)
    captions = F.normalize(torch.cat([captions, torch.randn(CLIPS, DIM)]), dim=-1)  # 10,040 captions
    query_clips = {m: e[:25] for m, e in zip(["video", "audio", "subtitle"], clip, strict=False)}
    brute = gram_volume(captions, *query_clips.values()).T  # [clips, captions]
    scores, found = search_captions(query_clips, captions, k=5, chunk_bytes=2**18)
    _assert_same_topk(scores, found, brute, 5)


@pytest.mark.parametrize("queries", [1, 40])  # a float16 product (few queries) or the index widened to float32
def test_float16_index_finds_the_same_clips(queries):
    """Half the bytes: the GEMM ranks candidates at float16, the exact pass decides on the stored embeddings."""
    clip, query_rows = _aligned_collection(CLIPS, 2, seed=2)
    query_rows = query_rows[:queries]
    half = [e.half().float() for e in clip]  # what the float16 index stores
    scores, found = search_clips(query_rows, _index(clip, torch.float16), k=5)
    _assert_same_topk(scores, found, gram_volume(query_rows, *half), 5)


def test_closed_form_matches_gram_volume_and_cosine_search_is_plain_cosine():
    clip, queries = _aligned_collection(500, 2, seed=3)
    index = _index(clip)
    torch.testing.assert_close(
        squared_volumes(queries, index.basis, index.span_volume_sq).sqrt(),
        gram_volume(queries, *clip),
        atol=2e-3,
        rtol=0,
    )
    scores, found = search_clips(queries, index, k=7, score="cosine", cosine_modality="audio", chunk_bytes=4096)
    want = (queries @ clip[1].T).topk(7, dim=1)
    torch.testing.assert_close(scores, want.values)
    assert torch.equal(found, want.indices)


def test_bad_queries_are_refused_with_the_expected_shape():
    clip, queries = _aligned_collection(100, 2)
    with pytest.raises(ValueError, match=r"\[Q, 64\]"):
        search_clips(queries[:, :32], _index(clip), k=3)
    with pytest.raises(ValueError, match="no 'depth' embeddings"):
        search_clips(queries, _index(clip), k=3, score="cosine", cosine_modality="depth")


# --- near-duplicate clips: candidates chosen by an error bound, not a fixed margin --------------------------------


def _near_duplicate_clusters(modalities: int, seed: int = 0, clusters: int = 60, size: int = 100, dim: int = 256):
    """`clusters` centres, each with `size` near-duplicate clips (noise 1e-5 to 1e-6 around the centre, as re-uploads
    and adjacent clips of one video are), and 24 queries lying nearly in a centre's span: their top 10 differ in
    volume by less than the GEMM form's rounding, in float16 and in float32."""
    g = torch.Generator().manual_seed(seed)
    centres = [F.normalize(torch.randn(clusters, dim, generator=g), dim=-1) for _ in range(modalities)]
    noise = torch.logspace(-5, -6, size)[None, :, None]
    clip = [F.normalize((c[:, None] + noise * torch.randn(clusters, size, dim, generator=g)).flatten(0, 1), dim=-1)
            for c in centres]  # fmt: skip
    picked = torch.randint(clusters, (24,), generator=g)
    mix = torch.rand(24, modalities, generator=g)
    queries = sum(mix[:, i, None] * centres[i][picked] for i in range(modalities))
    return clip, F.normalize(queries + 1e-3 * torch.randn(24, dim, generator=g), dim=-1)


def _same_sets(found: torch.Tensor, brute: torch.Tensor, k: int) -> None:
    want = brute.topk(k, dim=1, largest=False).indices
    wrong = [q for q in range(len(found)) if set(found[q].tolist()) != set(want[q].tolist())]
    assert not wrong, f"{len(wrong)} of {len(found)} queries differ from brute force: {wrong}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("queries", [1, 24])  # float16: a float16 product (few queries) or the index widened
def test_near_duplicate_clips_top_k_equals_brute_force(dtype, queries):
    clip, query_rows = _near_duplicate_clusters(2)
    query_rows = query_rows[:queries]
    index = _index(clip, dtype)
    brute = gram_volume(query_rows.double(), *(e.to(dtype).double() for e in clip))  # over what the index stores
    scores, found = search_clips(query_rows, index, k=10)
    _same_sets(found, brute, 10)
    torch.testing.assert_close(scores.double(), brute.gather(1, found), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_near_duplicate_captions_top_k_equals_brute_force(dtype):
    """Clip -> captions: clusters of near-duplicate captions, query clips whose span nearly holds a centre."""
    centres, _ = _near_duplicate_clusters(1, seed=4)
    captions = centres[0].to(dtype)
    g = torch.Generator().manual_seed(5)
    held = captions[torch.randperm(len(captions), generator=g)[:12]].float()
    other = F.normalize(torch.randn(12, held.shape[1], generator=g), dim=-1)
    clips = {
        "video": F.normalize(held + other + 1e-3 * torch.randn(other.shape, generator=g), dim=-1),
        "audio": F.normalize(held - other + 1e-3 * torch.randn(other.shape, generator=g), dim=-1),
    }
    brute = gram_volume(captions.double(), *(v.double() for v in clips.values())).T
    scores, found = search_captions(clips, captions, k=10)
    _same_sets(found, brute, 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("queries", [1, 24])
def test_the_error_bound_holds_for_every_clip(dtype, queries):
    """The bound the candidates are chosen by is a bound: |GEMM estimate - exact volume^2| <= it, for every query
    and clip, near-duplicates and the far clips alike (over the stored embeddings, as search reads them)."""
    clip, query_rows = _near_duplicate_clusters(3, seed=6, clusters=20)
    query_rows = torch.cat([query_rows[:queries], F.normalize(torch.randn(queries, query_rows.shape[1]), dim=-1)])
    index = _index(clip, dtype)
    estimate = squared_volumes(query_rows, index.basis, index.span_volume_sq)
    model = ErrorModel.of_index(index.basis, index.embeddings["video"], len(query_rows))
    t_sq = (query_rows**2).sum(-1, keepdim=True)
    bound = volume_error_bound(estimate, t_sq, index.span_volume_sq[None, :], model)
    exact = gram_volume(query_rows.double(), *(e.to(dtype).double() for e in clip)) ** 2
    assert ((estimate.double() - exact).abs() <= bound.double()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("queries", [1, 24])
def test_no_clip_the_scan_leaves_out_is_below_its_floor(dtype, queries):
    """The scan bounds only the clips it keeps (the lowest estimates); every other clip's lower end is at least
    _beyond_kept's floor. Checked against every clip's own bound, near-duplicates and far clips alike."""
    clip, query_rows = _near_duplicate_clusters(2, seed=7, clusters=20)
    query_rows = torch.cat([query_rows[:queries], F.normalize(torch.randn(queries, query_rows.shape[1]), dim=-1)])
    index = _index(clip, dtype)
    estimate = squared_volumes(query_rows, index.basis, index.span_volume_sq)
    model = ErrorModel.of_index(index.basis, index.embeddings["video"], len(query_rows))
    t_sq = (query_rows**2).sum(-1, keepdim=True)
    lower = estimate - volume_error_bound(estimate, t_sq, index.span_volume_sq[None, :], model)
    kept = estimate.topk(_kept(10), dim=1, largest=False)
    left_out = torch.ones_like(estimate, dtype=torch.bool).scatter_(1, kept.indices, False)
    floor = _beyond_kept(kept.values[:, -1], lambda x: volume_error_bound(x, t_sq, index.span_volume_sq.max(), model))
    assert torch.isfinite(floor).all()  # the secant slope is below 1 here: the floor is given
    assert (lower[left_out].view(len(query_rows), -1) >= floor[:, None]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_cluster_larger_than_the_scan_keeps_is_scanned_again_and_stays_exact(dtype):
    """400 near-duplicates around each query's best clips: more candidates than the scan keeps (_kept(10) = 138),
    so those queries are scanned again for every clip under their threshold; the top 10 still equal brute force."""
    clip, query_rows = _near_duplicate_clusters(2, seed=8, clusters=4, size=400)
    query_rows = query_rows[:6]
    index = _index(clip, dtype)
    candidates = volume_candidates(query_rows, index, k=10)
    assert max(len(c) for c in candidates) > _kept(10)  # the second scan ran
    brute = gram_volume(query_rows.double(), *(e.to(dtype).double() for e in clip))
    scores, found = search_clips(query_rows, index, k=10)
    _same_sets(found, brute, 10)

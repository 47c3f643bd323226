"""`gram-ray bench search` on a small synthetic index: both dtypes measured, exact, and the sizes it reports."""

import json

from click.testing import CliRunner

from gram_ray.cli import main


def test_bench_search_reports_latency_bytes_memory_and_exactness(tmp_path):
    result = CliRunner().invoke(
        main,
        ["bench", "search", "--clips", "5000", "--dim", "64", "--queries", "20", "--reps", "1", "--json",
         str(tmp_path / "s.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s.json").read_text())
    by_dtype = {r["dtype"]: r for r in report["results"]}
    assert set(by_dtype) == {"float16", "float32"}
    for dtype, size in (("float16", 2), ("float32", 4)):
        r = by_dtype[dtype]
        assert r["exact"] and r["clips"] == 5000 and r["one_query_ms"] > 0 and r["batch_ms"] > 0
        # 2 modalities' embeddings + the 2-vector basis, D = 64, plus the float32 span volume
        assert r["search_bytes_per_clip"] == 4 * 64 * size + 4
        assert r["search_bytes_per_clip"] < r["stored_bytes_per_clip"] < 3 * r["search_bytes_per_clip"] + 200
        assert r["peak_search_bytes"] is None or r["peak_search_bytes"] >= 0
    assert "= brute force" in result.output and "5,000 clips" in result.output

"""The library/trainer split users rely on: the math, the model, the metrics and the loop import without Ray or
the media decoders (notebooks, torchrun, other trainers)."""

import subprocess
import sys

LIBRARY = [
    "gram_ray.volume",
    "gram_ray.loss",
    "gram_ray.model",
    "gram_ray.model.gram",
    "gram_ray.model.checkpoint",
    "gram_ray.retrieval.metrics",
    "gram_ray.retrieval.rerank",
    "gram_ray.train.loop",
    "gram_ray.data.collate",
]


def test_library_and_loop_import_without_ray_or_decoders():
    code = (
        f"import sys\nfor m in {LIBRARY!r}: __import__(m)\n"
        "print(sorted(m for m in ('ray', 'av', 'decord', 'torchaudio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

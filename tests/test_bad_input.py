"""Every command's bad input ends as one `Error: ...` line that names the problem, never a traceback: files and
folders missing, unreadable, of the wrong kind or corrupt, a bucket that cannot be reached, numbers out of range.
The cases run on the session's Ray, so that a command that gets as far as starting Ray does not start one in this
process (most stop before: their inputs are checked first)."""

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gram_ray.cli import main
from gram_ray.cluster.processes import free_port

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")

# (what is wrong, the command line ({bad} is a folder of bad files, {repo} this repository), what the error names)
CASES = [
    # missing
    ("config missing", ["train", "--out", "{bad}/run", "--config", "{bad}/nope.yaml"], "nope.yaml"),
    ("annotations missing", ["preprocess", "--annotations", "{bad}/nope.json", "--out", "{bad}/o"], "nope.json"),
    ("checkpoint missing", ["evaluate", "--checkpoint", "{bad}/nope", "--data", "{bad}/folder"], "nope"),
    ("index missing", ["search", "--index", "{bad}/nope", "a dog"], "nope"),
    ("GRAM checkpoint missing", ["import-checkpoint", "{bad}/nope.pt", "--out", "{bad}/o"], "nope.pt"),
    ("cluster YAML missing", ["cluster", "check", "--yaml", "{bad}/nope.yaml", "--config", DEMO], "nope.yaml"),
    ("cache missing", ["bench", "shuffle", "--cache", "{bad}/nope"], "nope"),
    ("videos missing", ["bench", "decode", "--videos", "{bad}/nope"], "nope"),
    ("embeddings missing", ["evaluate-embeddings", "{bad}/nope"], "nope"),
    # unreadable: a symbolic link to itself (root reads any file whatever its mode)
    ("config unreadable", ["train", "--out", "{bad}/run", "--config", "{bad}/loop.yaml"], "loop.yaml"),
    ("annotations unreadable", ["preprocess", "--annotations", "{bad}/loop.yaml", "--out", "{bad}/o"], "loop.yaml"),
    ("cluster YAML unreadable", ["cluster", "local", "{bad}/loop.yaml"], "loop.yaml"),
    # the wrong kind of file
    ("README as a cluster YAML", ["cluster", "check", "--yaml", "{repo}/README.md", "--config", DEMO], "README.md"),
    ("a config as a cluster YAML", ["cluster", "check", "--yaml", DEMO, "--config", DEMO], "demo.yaml"),
    ("text as a config", ["train", "--out", "{bad}/run", "--config", "{bad}/words.txt"], "words.txt"),
    ("binary as a config", ["train", "--out", "{bad}/run", "--config", "{bad}/binary.yaml"], "binary.yaml"),
    ("a folder as annotations", ["preprocess", "--annotations", "{bad}/folder", "--out", "{bad}/o"], "folder"),
    ("binary annotations", ["preprocess", "--annotations", "{bad}/binary.json", "--out", "{bad}/o"], "binary.json"),
    ("a folder as a checkpoint", ["evaluate", "--checkpoint", "{bad}/folder", "--data", "{bad}/folder"], "folder"),
    ("a file as an index", ["search", "--index", "{bad}/words.txt", "a dog"], "words.txt"),
    ("binary as a GRAM checkpoint", ["import-checkpoint", "{bad}/binary.yaml", "--out", "{bad}/o"], "binary.yaml"),
    ("a file as synth's folder", ["synth", "--out", "{bad}/words.txt", "--n", "16"], "words.txt"),
    ("a folder that is no dataset", ["demo", "--data", "{bad}/folder"], "folder"),
    # corrupt JSON or YAML
    ("corrupt config", ["train", "--out", "{bad}/run", "--config", "{bad}/corrupt.yaml"], "corrupt.yaml"),
    ("corrupt sweep config", ["tune", "--config", "{bad}/corrupt.yaml"], "corrupt.yaml"),
    ("corrupt cluster YAML", ["cluster", "local", "{bad}/corrupt.yaml"], "corrupt.yaml"),
    ("corrupt annotations", ["preprocess", "--annotations", "{bad}/corrupt.json", "--out", "{bad}/o"], "corrupt.json"),
    (
        "corrupt annotations in a config",
        ["train", "--out", "{bad}/run", "--config", DEMO, "--set", "data.train_annotations={bad}/corrupt.json"]
        + ["--set", "data.video_dir={bad}"],
        "corrupt.json",
    ),
    ("corrupt index.json", ["search", "--index", "{bad}/broken-index", "a dog"], "index.json"),
    ("corrupt bench train JSON", ["bench", "data", "--train-json", "{bad}/corrupt.json"], "corrupt.json"),
    ("corrupt embeddings", ["evaluate-embeddings", "{bad}/broken-embeddings"], "video.npy"),
    # a bucket that cannot be reached (storage pointed at a port where nothing listens)
    ("index in an unreachable bucket", ["search", "--index", "s3://bucket/index", "a dog"], "cannot reach"),
    (
        "annotations in an unreachable bucket",
        ["train", "--out", "{bad}/run", "--config", DEMO, "--set", "data.train_annotations=s3://bucket/a.json"],
        "cannot reach s3://bucket/a.json",
    ),
    (
        "checkpoint in an unreachable bucket",
        ["evaluate", "--checkpoint", "s3://b/ckpt", "--data", "{bad}/folder"],
        "ckpt",
    ),
    ("weights in an unreachable bucket", ["import-checkpoint", "s3://bucket/gram.pt", "--out", "{bad}/o"], "gram.pt"),
    # what a job will read or write, checked before anything is decoded or any GPU is asked for (before paying)
    (
        "weights missing",
        ["train", "--out", "{bad}/run", "--config", DEMO, "--set", "model.init_from={bad}/nope"],
        "/nope: no such folder",
    ),
    ("a folder as weights", ["tune", "--config", DEMO, "--set", "model.init_from={bad}/folder"], "no state.pt"),
    (
        "encoder weights missing",
        ["train", "--out", "{bad}/run", "--config", DEMO, "--set", "model.vision.pretrained={bad}/EVA01_CLIP_g_14.pt"],
        "model.vision.pretrained=",
    ),
    (
        "run storage in an unreachable bucket",
        ["train", "--out", "{bad}/run", "--config", DEMO, "--set", "run.storage_path=s3://bucket/runs"],
        "run.storage_path=s3://bucket/runs: cannot reach",
    ),
    (
        "run storage below a file",
        ["train", "--out", "{bad}/run", "--config", DEMO, "--set", "run.storage_path={bad}/words.txt/runs"],
        "run.storage_path=",
    ),
    (
        "a cache below a file",
        ["preprocess", "--annotations", "{bad}/words.txt", "--out", "{bad}/words.txt/o"],
        "--out=",
    ),
    # numbers out of range
    ("a negative learning rate", ["train", "--out", "{bad}/run", "--config", DEMO, "--set", "train.lr=-1"], "train.lr"),
    ("too few synthetic clips", ["synth", "--out", "{bad}/s", "--n", "0"], "--n"),
    ("no results a query", ["search", "--index", "{bad}/folder", "-k", "0", "a dog"], "-k"),
    ("negative GPU memory", ["cluster", "check", "--yaml", "{repo}/cluster/aws.yaml", "--gpu-gb", "-1"], "--gpu-gb"),
    ("no index workers", ["index", "--checkpoint", "c", "--data", "d", "--out", "o", "--workers", "0"], "--workers"),
    ("no local node CPUs", ["cluster", "local", "{repo}/cluster/aws.yaml", "--node-cpus", "0"], "--node-cpus"),
    ("an empty search benchmark", ["bench", "search", "--clips", "0"], "--clips"),
]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    bad = tmp_path_factory.mktemp("bad-input")
    (bad / "folder").mkdir()
    (bad / "words.txt").write_text("hello\n")
    (bad / "corrupt.yaml").write_text("data: [1, 2\n")
    (bad / "corrupt.json").write_text('{"video_id": ')
    (bad / "binary.yaml").write_bytes(np.random.default_rng(0).integers(128, 256, 2000, dtype=np.uint8).tobytes())
    (bad / "binary.json").write_bytes((bad / "binary.yaml").read_bytes())
    os.symlink(bad / "loop.yaml", bad / "loop.yaml")
    (bad / "broken-index").mkdir()
    (bad / "broken-index" / "index.json").write_text("{not json")
    (bad / "broken-embeddings").mkdir()
    np.save(bad / "broken-embeddings" / "text.npy", np.eye(3, dtype=np.float32))
    (bad / "broken-embeddings" / "video.npy").write_bytes(b"not numpy")
    return bad


@pytest.mark.parametrize("problem, command, names", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_error_line(problem, command, names, bad, monkeypatch, ray_session):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    args = [a.format(bad=bad, repo=REPO) for a in command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"{problem}: a traceback ({result.exception!r})"
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"{problem}: {result.output}"
    assert names in errors[0], f"{problem}: the error does not name {names!r}: {errors[0]}"
    assert "Traceback" not in result.output

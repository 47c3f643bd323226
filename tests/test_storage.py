"""Local paths and storage URIs go through the same helpers (checkpoints, results and caches on clusters)."""

from pathlib import Path

from click.testing import CliRunner

from gram_ray import storage
from gram_ray.cli import main


def test_uris_keep_their_scheme_and_local_paths_become_absolute(tmp_path, monkeypatch):
    assert storage.join("s3://bucket/runs", "exp", "cache") == "s3://bucket/runs/exp/cache"
    assert storage.join("gs://bucket", "a") == "gs://bucket/a"
    assert storage.absolute("s3://bucket/x") == "s3://bucket/x"
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs") == str(tmp_path / "runs")


def test_read_write_list_delete_through_a_uri(tmp_path):
    root = f"file://{tmp_path}/store"
    storage.write_text(storage.join(root, "run", "result.json"), "{}")
    storage.write_text(storage.join(root, "run", "b.jsonl"), "x\n")
    assert storage.exists(storage.join(root, "run", "result.json"))
    assert storage.read_text(storage.join(root, "run", "result.json")) == "{}"
    assert storage.list_files(storage.join(root, "run"), ".jsonl") == [storage.join(root, "run", "b.jsonl")]
    assert storage.total_bytes(storage.join(root, "run")) == 4
    assert (tmp_path / "store" / "run" / "result.json").read_text() == "{}"  # the same bytes, seen locally
    storage.delete_dir(storage.join(root, "run"))
    storage.delete_dir(storage.join(root, "run"))  # nothing there: no error
    assert not Path(tmp_path, "store", "run").exists() and storage.list_files(storage.join(root, "run")) == []


def test_cli_takes_uris_where_storage_may_be_remote(tmp_path):
    """click.Path would collapse s3://bucket into s3:/bucket: the options that may name storage are strings."""
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", f"file://{tmp_path}/nope", "--data", str(tmp_path)])
    assert result.exit_code != 0 and f"file://{tmp_path}/nope is not a gram-ray checkpoint folder" in result.output

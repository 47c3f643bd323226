"""Object storage as it fails: the fault layer (tests/storage_faults.py) in front of the local S3 server, and what
gram-ray's storage does with each fault: retried where the settings allow, a clear bounded error where they do
not, and never an object that looks whole but is cut off."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from storage_faults import Fault, FaultyS3

from gram_ray import storage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def proxy(s3, monkeypatch):
    """The fault layer in front of the session's S3 server, this process's S3 clients pointed at it, with 3
    attempts a request, short timeouts (a stalled request is a failed try after 2 s) and no retries past the
    client's own (outage_s 0): the defaults' worst case is minutes, measured in docs/faults.md."""
    layer = FaultyS3(s3.port, seed=29)
    monkeypatch.setenv("AWS_ENDPOINT_URL", layer.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("GRAM_RAY_STORAGE_REQUEST_TIMEOUT_S", "2")
    monkeypatch.setenv("GRAM_RAY_STORAGE_CONNECT_TIMEOUT_S", "2")
    monkeypatch.setenv("GRAM_RAY_STORAGE_OUTAGE_S", "0")
    storage.configure(storage.settings())
    yield layer
    layer.stop()
    monkeypatch.undo()
    storage.configure(storage.settings())  # the session's own endpoint and settings again


def test_settings_come_from_the_environment_as_aws_tools_read_them_and_bad_values_are_named(monkeypatch):
    from gram_ray.config import load_config

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")  # the SDKs' rate limiter: pyarrow has none, so standard
    chosen = storage.StorageSettings.from_env()
    assert (chosen.max_attempts, chosen.retry_mode, chosen.outage_s) == (7, "standard", 120.0)
    # A config's keys win over the environment's, which win over the defaults.
    cfg = load_config(None, ["storage.max_attempts=3", "storage.outage_s=30"])
    settings = storage.StorageSettings.of(cfg.storage)
    assert (settings.max_attempts, settings.outage_s, settings.retry_mode) == (3, 30.0, "standard")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="AWS_MAX_ATTEMPTS='many' is not a valid int"):
        storage.StorageSettings.from_env()


@pytest.mark.parametrize("kind", ["503", "500", "reset", "cut", "stall"])
def test_each_kind_of_transient_fault_is_ridden_out_by_the_clients_retries(proxy, s3, kind):
    """Two faults in a row on the object's upload and two on its download, fewer than the 3 attempts: the write
    and the read succeed with the same bytes, and the log shows the faults, then the requests that went through."""
    bucket = s3.bucket()
    uri, text = f"{bucket}/faults/{kind}.json", '{"clips": 24}' * 1000
    proxy.add(Fault(kind, method="POST", key=rf"{kind}\.json\?uploads", nth=(1, 2), stall_s=4))
    storage.write_text(uri, text)
    proxy.heal()
    proxy.add(Fault(kind, method="GET", key=rf"{kind}\.json", nth=(1, 2), stall_s=4))
    assert storage.read_text(uri) == text
    outcomes = [(e.method, e.outcome) for e in proxy.entries(key=rf"{kind}\.json")]
    assert outcomes[:3] == [("POST", kind), ("POST", kind), ("POST", "200")]
    assert [o for o in outcomes if o[0] == "GET"][:3] == [("GET", kind), ("GET", kind), ("GET", "206")]
    assert proxy.injected() == {kind: 4}


def test_a_fault_past_the_settings_ends_in_an_error_naming_storage_and_the_object(proxy, s3, monkeypatch):
    bucket = s3.bucket()
    uri = f"{bucket}/gone/report.json"
    text = json.dumps({"clips": list(range(300))})  # larger than S3's error body: see the next test
    storage.write_text(uri, text)
    proxy.add(Fault("503", method="GET", key=r"gone/report\.json"))
    monkeypatch.setenv("GRAM_RAY_STORAGE_OUTAGE_S", "4")  # then 1 + 2 s of backoff, then the error
    started = time.monotonic()
    with pytest.raises(
        storage.StorageError, match=rf"storage failed reading {uri}: \d tries over \d s, the last: AWS"
    ) as e:
        storage.read_text(uri)
    assert time.monotonic() - started < 4 + 3 * 3  # outage_s, and the last try's 3 attempts (backoff under 3 s)
    tries = int(str(e.value).split(": ")[1].split()[0])
    assert tries >= 2 and len(proxy.entries(method="GET", key=r"gone/report\.json")) == 3 * tries
    proxy.heal()
    assert storage.read_text(uri) == text  # storage back: the same call works


def test_an_object_smaller_than_s3s_error_body_is_retried_by_gram_ray_where_the_client_gives_up_at_once(
    proxy, s3, monkeypatch
):
    """pyarrow reads a small object into a buffer of the object's size; S3's XML error body does not fit, and the
    AWS SDK reports "Failed to flush response stream" (INTERNAL_FAILURE) without trying again. A 503 on a small
    JSON file (a done record, position.json) is one try for the client; gram-ray's operation retries carry it."""
    bucket = s3.bucket()
    uri = f"{bucket}/small/position.json"
    storage.write_text(uri, "{}")
    proxy.add(Fault("503", method="GET", key=r"small/position\.json", nth=(1, 2)))
    monkeypatch.setenv("GRAM_RAY_STORAGE_OUTAGE_S", "10")
    assert storage.read_text(uri) == "{}"
    assert [e.outcome for e in proxy.entries(method="GET", key="small/position")] == ["503", "503", "206"]


def test_a_missing_object_is_not_retried(proxy, s3):
    bucket = s3.bucket()
    with pytest.raises(FileNotFoundError):
        storage.read_text(f"{bucket}/nothing-here.json")
    assert [(e.method, e.outcome) for e in proxy.entries(key="nothing-here")] == [("HEAD", "404")]


@pytest.mark.ray
def test_a_ray_worker_uses_the_storage_settings_of_its_environment_and_of_a_filesystem_sent_to_it(
    proxy, s3, ray_session, monkeypatch
):
    """A task started with AWS_MAX_ATTEMPTS=4 (a job's workers get the driver's settings this way: FORWARDED_ENV)
    tries a failing read 4 times; a filesystem built in the driver with 6 attempts and sent to a task keeps its 6
    (pyarrow's own S3FileSystem loses its retry strategy when pickled: apache/arrow GH-47348)."""
    import ray

    bucket = s3.bucket()
    uri = f"{bucket}/worker/blocked.bin"
    storage.write_text(uri, "x" * 4096)
    proxy.add(Fault("503", method="GET", key=r"worker/blocked\.bin"))

    @ray.remote(num_cpus=0.1)
    def read_there(target, fs=None, path=None):
        from gram_ray import storage as worker_storage

        try:
            if fs is None:
                worker_storage.read_bytes(target)
            else:
                with fs.open_input_stream(path) as f:
                    f.read()
        except OSError as e:
            return f"{type(e).__name__}: {e}", os.getpid()
        return "read", os.getpid()

    env = {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "4", "GRAM_RAY_STORAGE_OUTAGE_S": "0"}
    message, pid = ray.get(read_there.options(runtime_env={"env_vars": env}).remote(uri))
    assert pid != os.getpid() and message.startswith("StorageError: storage failed reading")
    assert len(proxy.entries(method="GET", key=r"worker/blocked\.bin")) == 4

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "6")
    fs, path = storage.resolve(uri)
    assert isinstance(fs, storage.SettledS3FileSystem) and fs.settings.max_attempts == 6
    message, _ = ray.get(read_there.remote(uri, fs, path))  # the task's own environment says 10
    assert message.startswith("OSError: AWS Error")
    assert len(proxy.entries(method="GET", key=r"worker/blocked\.bin")) == 4 + 6


def _write_then_fail(stream):
    stream.write(b"x" * 1_000_000)
    raise RuntimeError("the writer failed midway")


@pytest.mark.parametrize("where", ["bucket", "local"])
def test_a_write_that_fails_midway_stores_nothing_and_keeps_the_previous_object(s3, tmp_path, where):
    """pyarrow's output stream completes an upload when closed, even by an exception (apache/arrow#40502): had the
    writer written into it, the first megabyte would now be an object. Every storage write goes through this."""
    root = s3.bucket() if where == "bucket" else str(tmp_path)
    for name in ("new.parquet", "old.parquet"):
        target = storage.join(root, "shards", name)
        if name == "old.parquet":
            storage.write_text(target, "the whole earlier version")
        with pytest.raises(RuntimeError, match="midway"):
            storage.write_bytes_with(target, _write_then_fail)
    assert storage.list_names(storage.join(root, "shards")) == ["old.parquet"]
    assert storage.read_text(storage.join(root, "shards", "old.parquet")) == "the whole earlier version"


@pytest.mark.parametrize("size_mb", [0.01, 25])  # one request, and a multipart upload of 3 parts
def test_an_upload_cut_mid_body_leaves_the_object_whole_or_absent_never_cut_off(proxy, s3, size_mb):
    bucket = s3.bucket()
    data = os.urandom(int(size_mb * 1024 * 1024))
    target = f"{bucket}/cut/state.pt"
    proxy.add(Fault("cut", method="PUT", key=r"cut/state\.pt", nth=(1,)))  # the first body sent is cut: retried
    storage.put_bytes(target, data)
    assert storage.read_bytes(target) == data and proxy.injected() == {"cut": 1}
    proxy.heal()
    proxy.add(Fault("cut", method="PUT", key=r"cut/state\.pt"))  # every body cut: the write fails, named
    with pytest.raises(storage.StorageError, match=rf"storage failed writing {target}"):
        storage.put_bytes(target, os.urandom(len(data)))
    proxy.heal()
    assert storage.read_bytes(target) == data  # the earlier whole version, untouched


def test_a_checkpoint_folder_cut_off_by_storage_is_not_whole_and_its_manifest_says_why(proxy, s3, tmp_path):
    """Every upload of state.pt cut: the upload fails naming it, and the manifest (uploaded last) is not there.
    pyarrow's copy_files, which Ray Train's own checkpoint upload uses, returns here as if done, with state.pt
    never completed and the manifest uploaded after it: gram-ray uploads checkpoints itself."""
    from tiny import tiny_config

    from gram_ray.model.checkpoint import MANIFEST_FILE, manifest_problem, upload_checkpoint, write_checkpoint
    from gram_ray.train.resume import checkpoint_is_whole

    write_checkpoint(tmp_path / "ckpt", {"model": {}, "step": 3}, tiny_config())
    bucket = s3.bucket()
    fs, dest = storage.resolve(f"{bucket}/run/checkpoint_1")
    proxy.add(Fault("cut", method="PUT", key=r"checkpoint_1/state\.pt"))
    with pytest.raises(storage.StorageError, match=r"storage failed uploading .*checkpoint_1/state\.pt"):
        upload_checkpoint(tmp_path / "ckpt", fs, dest, target=f"{bucket}/run/checkpoint_1")
    folder = f"{bucket}/run/checkpoint_1"
    assert "state.pt" not in storage.list_names(folder) and MANIFEST_FILE not in storage.list_names(folder)
    assert not checkpoint_is_whole(folder)
    assert manifest_problem(folder) == f"it has no {MANIFEST_FILE} (written last: the checkpoint's writing was cut off)"
    proxy.heal()
    upload_checkpoint(tmp_path / "ckpt", fs, dest, target=folder)
    assert checkpoint_is_whole(folder) and manifest_problem(folder) is None
    assert storage.list_names(folder) == ["config.yaml", MANIFEST_FILE, "position.json", "state.pt"]


def test_every_write_to_storage_goes_through_the_helpers_that_never_leave_a_cut_off_object():
    """The table in docs/faults.md holds because nothing else writes: no module outside storage/ opens an output
    stream or copies files into a filesystem (Ray Train and Tune write their own state through the filesystem
    storage.run_storage gives them). Benchmarks' throwaway synthetic caches (bench/) may use Ray Data's writer."""
    offenders = []
    for path in sorted((REPO / "gram_ray").rglob("*.py")):
        if path.parent.name in ("storage", "bench"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("open_output_stream", "copy_files", "write_parquet"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.attr}")
    assert offenders == []


_WRITER = """
import os, sys
from gram_ray import storage
storage.put_bytes(sys.argv[1], os.urandom(int(sys.argv[2])))
"""


def test_a_writer_killed_mid_upload_leaves_no_object_and_the_uploads_command_aborts_what_it_left(proxy, s3):
    """A writer SIGKILLed while its 25 MB upload's second part hangs: no object appears under the name, and its
    other parts stay billed in an unfinished upload, until `gram-ray storage uploads --abort` aborts it."""
    from click.testing import CliRunner

    from gram_ray.cli import main
    from gram_ray.storage.uploads import unfinished_uploads

    bucket = s3.bucket()
    target = f"{bucket}/cache/shards/shard-00003.parquet"
    proxy.add(Fault("stall", method="PUT", key=r"shard-00003\.parquet\?partNumber=2", stall_s=60))
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, target, str(25 * 1024 * 1024)], env=os.environ.copy())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        proxy.entries(key=r"partNumber=2")
        and proxy.entries(key=r"partNumber=1", method="PUT")[-1:]
        and proxy.entries(key=r"partNumber=1", method="PUT")[-1].outcome == "200"
    ):
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    proxy.heal()
    assert not storage.exists(target)
    left = unfinished_uploads(f"{bucket}/cache")
    assert [u.key for u in left] == ["cache/shards/shard-00003.parquet"]
    assert 1 <= left[0].parts <= 2  # parts 1 and 3 (pyarrow uploads in the background), never part 2
    assert left[0].bytes >= 5 * 1024 * 1024  # S3's smallest part

    listed = CliRunner().invoke(main, ["storage", "uploads", f"{bucket}/cache", "--older-than", "0"])
    assert listed.exit_code == 0 and f"1 unfinished upload(s) under {bucket}/cache" in listed.output
    assert unfinished_uploads(f"{bucket}/cache") == left  # listing alone changes nothing
    print(f"\nunfinished upload of a killed writer: {left[0].parts} parts, {left[0].bytes} bytes")
    aborted = CliRunner().invoke(main, ["storage", "uploads", f"{bucket}/cache", "--older-than", "0", "--abort"])
    assert aborted.exit_code == 0 and f"aborted 1 upload(s): {left[0].bytes / 1e6:.1f} MB freed" in aborted.output
    assert unfinished_uploads(f"{bucket}/cache") == []


def test_an_index_whose_build_did_not_finish_is_refused_by_search_with_what_to_do(tmp_path):
    from gram_ray.retrieval.index import FORMAT, INDEX_FILE, SearchIndexError, load_index

    (tmp_path / INDEX_FILE).write_text(json.dumps({"format": FORMAT, "complete": False, "sources": []}))
    with pytest.raises(SearchIndexError, match="is not complete: its build is running or was stopped .* run the same"):
        load_index(tmp_path)


def test_a_metrics_log_cut_off_by_a_kill_mid_line_still_plots(tmp_path):
    from gram_ray.demo import plot_curves

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s, "val/text-video/t2v/R@1": 10.0 * s} for s in (1, 2, 3)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "train/lo')
    plot_curves(metrics, tmp_path / "curves.png", "val/text-video/t2v/R@1")
    assert (tmp_path / "curves.png").stat().st_size > 0


class _TaskError(OSError):
    """What Ray raises for a task's OSError: the remote traceback as its text, the original error as .cause."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"ray::ReadParquet->SplitBlocks(3)() (pid=1, ip=127.0.0.1)\n  File ...\n{cause}")
        self.cause = cause


RAY_DATA_READ = (
    "Could not open Parquet input source 'bucket/run/cache/train/shards/shard-00001.parquet': AWS Error SLOW_DOWN "
    "during GetObject operation: Please reduce your request rate.\nFailed to reading batches after 10/10 attempts "
    "(total backoff 97.0s).\nTo change retry attempts, backoff, or which errors are retried, configure "
    "`ray.data.DataContext.get_current()` if you believe this to be transient."
)


def test_a_storage_failure_past_ray_datas_own_retries_is_named_on_one_line():
    from gram_ray.cli.common import input_error

    failure = storage.failure_in(_TaskError(OSError(RAY_DATA_READ)), "reading the train cache", "s3://bucket/c")
    assert isinstance(failure, storage.StorageError)
    assert str(failure) == (
        "storage failed reading the train cache s3://bucket/c: Could not open Parquet input source "
        "'bucket/run/cache/train/shards/shard-00001.parquet': AWS Error SLOW_DOWN during GetObject operation: "
        "Please reduce your request rate. (10 tries, 97 s of backoff between them). Check storage (endpoint, region, "
        "credentials, the provider's status page) and run again (--resume auto continues a training run)"
    )
    # A read inside a file that opened: pyarrow's GetObject error names no object, so the message says so.
    inside = "AWS Error SERVICE_UNAVAILABLE during GetObject operation: \nFailed to reading batches after 10/10 "
    inside += "attempts (total backoff 121.8s)."
    assert str(storage.failure_in(_TaskError(OSError(inside)), "reading the val cache", "s3://bucket/c")) == (
        "storage failed reading the val cache s3://bucket/c (a read inside one of its files; pyarrow does not say "
        "which): AWS Error SERVICE_UNAVAILABLE during GetObject operation (10 tries, 122 s of backoff between them). "
        "Check storage (endpoint, region, credentials, the provider's status page) and run again (--resume auto "
        "continues a training run)"
    )
    # Not storage's: a bug, a missing file (the cache was deleted: its own error), a local disk's error.
    assert storage.failure_in(_TaskError(ValueError("bad batch")), "reading", "x") is None
    assert storage.failure_in(_TaskError(FileNotFoundError("AWS Error NO_SUCH_KEY")), "reading", "x") is None
    assert storage.failure_in(OSError(28, "No space left on device"), "reading", "x") is None
    # A StorageError raised in a Ray Data task comes back with Ray's advice appended to its text: one line still,
    # and the CLI prints it as it is.
    raised = storage.StorageError("storage failed writing s3://b/k: 2 tries over 9 s\nFailed to apply UDF transform")
    assert str(raised) == "storage failed writing s3://b/k: 2 tries over 9 s"
    assert input_error(_TaskError(raised)) == str(raised)

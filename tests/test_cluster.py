"""What users copy to run on clusters: the autoscaler YAMLs (Ray's own validator), the KubeRay manifests, and
`ray job submit` of jobs/train.py against a real Ray head started here on 127.0.0.1 with token authentication."""

import copy
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from tiny import OVERRIDES
from wandb_records import history, read_records

from gram_ray.cluster.processes import free_port, ray_head_command, stop_group, wait_until_up

REPO = Path(__file__).resolve().parents[1]
AUTOSCALER_YAMLS = sorted((REPO / "cluster").glob("*.yaml"))
KUBERAY = REPO / "cluster" / "kuberay"


def test_there_is_an_aws_and_a_gcp_cluster():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in AUTOSCALER_YAMLS}
    assert {"aws", "gcp"} <= providers


@pytest.mark.parametrize("path", AUTOSCALER_YAMLS, ids=lambda p: p.name)
def test_autoscaler_yaml_passes_rays_validator_and_gpus_scale_from_zero(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    types = prepared["available_node_types"]
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    cpu = [n for n, t in types.items() if n != prepared["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    assert cpu  # CPU workers for Ray Data decoding
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (SSH), not the internet
    text = path.read_text()
    assert "RAY_AUTH_MODE=token" in text and "auth_token" in text
    assert not any(secret in text.lower() for secret in ("aws_secret", "access_key", "private_key"))


def test_kuberay_manifests_parse_and_agree_on_image_and_entrypoint():
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")

    def images(spec):
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        return {c["image"] for pod in pods for c in pod["spec"]["containers"]}

    (image,) = images(cluster["spec"])
    assert images(job["spec"]["rayClusterSpec"]) == {image}
    assert {c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]} == {image}
    assert image.split(":")[-1] in (REPO / "cluster" / "Dockerfile").read_text()  # the tag the Dockerfile builds
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["enableInTreeAutoscaling"] and spec["authOptions"]["mode"] == "token"
        gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in str(g)]
        assert gpu and all(g["minReplicas"] == 0 for g in gpu)
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:2] == ["python", "jobs/train.py"] and (REPO / entry[1]).is_file()
    # the config cluster/README.md's walkthrough has the user write (into the checkout the image is built from)
    assert entry[entry.index("--config") + 1] == "configs/my-msrvtt.yaml"
    assert "`configs/my-msrvtt.yaml`" in (REPO / "cluster" / "README.md").read_text()
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == "/home/ray/gram-ray"
    assert "WORKDIR /home/ray/gram-ray" in (REPO / "cluster" / "Dockerfile").read_text()


def _ray_head(env: dict, temp_dir: str | None = None, dashboard: bool = True) -> tuple[subprocess.Popen, dict]:
    """`ray start --head --block` bound to 127.0.0.1 on free ports, in its own process group, so that exactly this
    head (and nothing else Ray on the machine, e.g. the test session's own instance) is stopped afterwards."""
    gcs, dashboard_port = free_port(), free_port()
    command = ray_head_command(gcs, num_cpus=8, dashboard_port=dashboard_port if dashboard else None, temp_dir=temp_dir)
    head = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return head, {"address": f"http://127.0.0.1:{dashboard_port}", "gcs": f"127.0.0.1:{gcs}"}


def _token_env(token: str) -> dict:
    return os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "WANDB_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # jobs run this venv's python
    }


@pytest.fixture(scope="module")
def local_head():
    """A Ray head on 127.0.0.1 with token auth, as a cluster's head is started."""
    token = secrets.token_hex(32)
    env = _token_env(token)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix sockets live under it
    head, info = _ray_head(env, temp_dir)
    info |= {"token": token, "env": env}
    if not wait_until_up(head, lambda: _client(info).list_jobs(), timeout_s=120):
        pytest.fail("the local Ray head did not come up within 120 s")
    try:
        yield info
    finally:
        stop_group(head)


def _client(head: dict, token: str | None = None):
    """A JobSubmissionClient for the local head, authenticated with its token (or the one given)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head["address"], headers={"authorization": f"Bearer {token or head['token']}"})


def _train_args(synth_small, out: Path, *extra: str) -> list[str]:
    sets = [
        *OVERRIDES,
        "train.epochs=2",
        f"data.train_annotations={synth_small['train']}",
        f"data.val_annotations={synth_small['val']}",
        f"data.video_dir={synth_small['videos']}",
        f"data.audio_dir={synth_small['audios']}",
        *extra,
    ]
    return ["--config", "configs/demo.yaml", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


def _wait(client, job_id: str, timeout: float = 600) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job_id} still {status} after {timeout} s"
        time.sleep(2)
    return status


def _folders(uri: str) -> list[str]:
    """The names of the folders directly under a storage URI."""
    import pyarrow.fs as pafs

    from gram_ray import storage

    fs, path = storage.resolve(uri)
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory]


def _assert_trained(result_json: Path) -> dict:
    result = json.loads(result_json.read_text())
    assert "val/text-video-audio/t2v/R@1" in result["best_metrics"]
    return result


@pytest.mark.ray
@pytest.mark.slow
def test_job_submitted_with_the_cli_trains_and_writes_its_outputs(local_head, synth_small, tmp_path):
    from ray.job_submission import JobStatus

    job_id = f"cli-{uuid.uuid4().hex[:8]}"
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        local_head["address"],
        "--submission-id",
        job_id,
        "--working-dir",
        ".",
        "--no-wait",
        "--",
        "python",
        "jobs/train.py",
        *_train_args(synth_small, tmp_path / "run"),
    ]
    submitted = subprocess.run(cmd, cwd=REPO, env=local_head["env"], capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    client = _client(local_head)
    status = _wait(client, job_id)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    result = _assert_trained(tmp_path / "run" / "result.json")
    assert (Path(result["checkpoint"]) / "state.pt").is_file()
    assert "best checkpoint:" in client.get_job_logs(job_id)


@pytest.mark.ray
@pytest.mark.slow
def test_a_job_with_everything_in_a_bucket_then_evaluated_from_the_bucket_alone(
    local_head, s3, synth_small, ray_session, tmp_path
):
    """The demo's pipeline with its media, annotations, caches, checkpoints and results in S3 (the local S3
    server): no shared filesystem. Then the run's local folder is deleted and the best checkpoint is evaluated
    straight from the bucket."""
    from click.testing import CliRunner
    from ray.job_submission import JobStatus

    from gram_ray import storage
    from gram_ray.cli import main

    data = s3.upload_dataset(synth_small)
    bucket = s3.bucket_of(data)
    client = _client(local_head)
    args = _train_args(
        data, tmp_path / "run", f"run.storage_path={bucket}/runs", "run.name=s3-run", "wandb.enabled=true"
    )
    job_id = client.submit_job(
        entrypoint=shlex.join(["python", "jobs/train.py", *args]),
        runtime_env={"working_dir": str(REPO), "env_vars": {"WANDB_MODE": "offline"}},  # W&B on, with no account
    )
    status = _wait(client, job_id)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    run = f"{bucket}/runs/s3-run"
    result = json.loads(storage.read_text(f"{run}/result.json"))
    assert "val/text-video-audio/t2v/R@1" in result["best_metrics"]
    assert result["checkpoint"].startswith(run) and storage.exists(f"{result['checkpoint']}/state.pt")
    assert storage.list_files(f"{run}/cache/train/shards", ".parquet")
    assert storage.exists(f"{run}/cache/val/report.json") and storage.exists(f"{run}/config.yaml")

    shutil.rmtree(tmp_path / "run")  # nothing a later job needs stayed on the driver's disk
    # What the run reported outlives rank 0's node: metrics.jsonl and the W&B run, copied to the run's storage.
    lines = storage.read_text(f"{run}/metrics.jsonl").splitlines()
    assert [json.loads(line)["step"] for line in lines if "train/loss" in line][-1] == result["last_metrics"]["step"]
    run_id = storage.read_text(f"{run}/wandb-run-id").strip()
    (folder,) = _folders(f"{run}/wandb")
    assert folder.endswith(f"-{run_id}")
    (record_file,) = storage.list_files(f"{run}/wandb/{folder}", ".wandb")
    local_record = tmp_path / "run.wandb"
    local_record.write_bytes(storage.read_bytes(record_file))
    logged = [row["step"] for row in history(read_records(local_record)) if "train/loss" in row]
    assert logged and logged == sorted(logged) and logged[-1] == result["last_metrics"]["step"]
    evaluated = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--checkpoint",
            result["checkpoint"],
            "--data",
            f"{run}/cache/val",
            "--json",
            str(tmp_path / "e.json"),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert (
        metrics["volume"]["text-video-audio"]["t2v"]["R@1"]
        == result["best_eval"]["volume"]["text-video-audio"]["t2v"]["R@1"]
    )


@pytest.mark.ray
def test_the_job_server_refuses_a_wrong_token(local_head):
    with pytest.raises(Exception, match="(?i)auth"):
        _client(local_head, token="not-the-token").list_jobs()


@pytest.mark.ray
@pytest.mark.slow
def test_a_failing_job_exits_non_zero(local_head, tmp_path):
    from ray.job_submission import JobStatus

    client = _client(local_head)
    job_id = client.submit_job(
        entrypoint="python jobs/train.py --config configs/demo.yaml --set data.train_annotations=/nonexistent.json "
        f"--out {tmp_path}",
        runtime_env={"working_dir": str(REPO)},
    )
    assert _wait(client, job_id, timeout=300) == JobStatus.FAILED
    assert "nonexistent.json" in client.get_job_logs(job_id)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.long  # about 2 minutes: in `make test-cluster`, to keep `make test` under 25 minutes on 2 cores
def test_a_killed_driver_is_continued_by_resume_auto_exactly_to_the_planned_steps(local_head, synth_small, tmp_path):
    # A `gram-ray train` driver attached to the cluster is SIGKILLed (its whole process group) right after a
    # mid-epoch checkpoint is registered; its workers die with it, the cluster stays. The same command with
    # `--resume auto` finds the newest whole checkpoint and finishes the run: the rest of that epoch (every later
    # mid-epoch checkpoint counts exactly the clips of its epoch's steps: none replayed, none skipped), then
    # the remaining epochs, up to the planned step. W&B (offline) records both as one run, steps going on.
    from tiny import synth_data, tiny_config

    from gram_ray.config import save_config
    from gram_ray.train.resume import SNAPSHOT

    cfg = tiny_config(
        "run.name=killed",
        "train.epochs=2",  # 16 clips / (2 x 2 workers): 4 steps an epoch, 8 in all
        "train.batch_size=2",
        "train.checkpoint_every_steps=1",
        "train.keep_checkpoints=1000",
        "train.eval_every_epochs=100",
        "scaling.num_workers=2",
        "data.materialize=never",  # 2 epochs: reading 16 clips twice beats copying them into the object store
        "wandb.enabled=true",
        *synth_data(synth_small, val=False),
    )
    save_config(cfg, tmp_path / "config.yaml")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "gram_ray", "train", "--config", str(tmp_path / "config.yaml"), "--out", str(out)]
    env = local_head["env"] | {"RAY_ADDRESS": local_head["gcs"], "WANDB_MODE": "offline"}
    snapshot = out / "ray" / "killed" / SNAPSHOT
    first = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, steps = time.monotonic() + 240, []
    while first.poll() is None and time.monotonic() < deadline:
        try:
            steps = [r["metrics"]["step"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (OSError, ValueError, KeyError):
            steps = []
        if steps and max(steps) % 4 in (1, 2):  # a mid-epoch checkpoint is registered: kill now
            break
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert steps and max(steps) < 8, first.stdout.read().decode()[-3000:]

    second = subprocess.run(command + ["--resume", "auto"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "--resume auto: continuing from" in second.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["last_metrics"]["step"] == result["last_metrics"]["total_steps"] == 8
    positions = [json.loads(p.read_text()) for p in (out / "ray" / "killed").glob("checkpoint_*/position.json")]
    assert any(p["step"] > max(steps) and not p["epoch_complete"] for p in positions)
    for p in positions:
        if not p["epoch_complete"]:
            progress = p["epoch_progress"]
            assert (progress["trained"], progress["repeats"]) == (4 * (p["step"] - 4 * p["epoch"]), 0), p
    run_id = (out / "ray" / "killed" / "wandb-run-id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"), key=lambda r: r.name)
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # the killed one and --resume auto
    resumed = [row["step"] for row in history(read_records(next(runs[1].glob("*.wandb")))) if "train/loss" in row]
    assert resumed == list(range(resumed[0], 9)) and 1 < resumed[0] <= max(steps) + 1  # from the checkpoint on


@pytest.mark.ray
@pytest.mark.slow
def test_without_ray_address_a_command_starts_its_own_ray_beside_a_ray_start_cluster(synth_small, tmp_path):
    """`ray start` records its cluster in <tmp>/ray/ray_current_cluster, which a bare ray.init() joins (and then
    refuses gram-ray's CPU count; with a killed head it cannot connect at all). gram-ray starts its own local Ray
    unless RAY_ADDRESS says otherwise; RAY_ADDRESS=auto joins that cluster, and says so. TMPDIR keeps this test's
    record apart from any other Ray on the machine."""
    env = _token_env(secrets.token_hex(32)) | {"TMPDIR": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    head, _ = _ray_head(env, dashboard=False)
    record = Path(env["TMPDIR"]) / "ray" / "ray_current_cluster"
    command = [sys.executable, "-m", "gram_ray", "preprocess", "--annotations", synth_small["val"]]
    command += ["--video-dir", synth_small["videos"], "--audio-dir", synth_small["audios"]]
    command += ["--set", "data.video.size=16", "--set", "data.video.num_frames=2", "--force"]

    def run(out: str, **extra: str) -> str:
        done = subprocess.run(
            [*command, "--out", str(tmp_path / out)], env=env | extra, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    try:
        deadline = time.monotonic() + 60
        while not record.is_file():
            assert time.monotonic() < deadline and head.poll() is None, "ray start did not come up"
            time.sleep(0.5)
        assert "started a local Ray" in run("beside-a-live-head")
        assert "joined the Ray cluster at" in run("joined", RAY_ADDRESS="auto")
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # killed without `ray stop`: its record stays behind
        head.wait()
    assert record.is_file()
    assert "started a local Ray" in run("after-a-killed-head")

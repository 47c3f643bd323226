"""`gram-ray cluster local`: the project's own cluster YAMLs, tried on this machine with Ray's real autoscaler
(its fake multi-node provider launches and removes nodes as local processes): the node types keep their
resources (scaled down, a GPU as `local_gpu`), min and max workers; a job that asks for GPUs brings the GPU node
type up from 0 to the YAML's maximum, and it goes back to 0 after the idle timeout (shortened to 15 s).

The two runs of whole jobs against the autoscaler (marker cluster_e2e, ~15 min together) are left out of
`make test` to keep it under 25 minutes on 2 cores; `make test-cluster` runs them, and CI runs both."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import synth_data

from gram_ray.cluster.check import read_node_types
from gram_ray.cluster.local import LOCAL_GPU, autoscaling_config, local_node_types

REPO = Path(__file__).resolve().parents[1]
FILES = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml", REPO / "cluster" / "kuberay" / "raycluster.yaml"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_local_cluster_keeps_the_node_types_and_passes_rays_validator(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    types = local_node_types(read_node_types(path), node_cpus=4, object_store_mb=200)
    config = autoscaling_config(types, idle_timeout_minutes=0.25, gcs_address="127.0.0.1:1")
    validate_config(prepare_config(copy.deepcopy(config)))
    originals = {t.name: t for t in read_node_types(path) if not t.head}
    assert set(config["available_node_types"]) == set(originals) | {config["head_node_type"]}
    for name, t in originals.items():
        local = config["available_node_types"][name]
        assert (local["min_workers"], local["max_workers"]) == (t.min_workers, t.max_workers)
        assert local["resources"]["CPU"] == min(4, t.resources["CPU"])
        assert local["resources"].get(LOCAL_GPU) == t.resources.get("GPU") and "GPU" not in local["resources"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.cluster_e2e
def test_aws_yaml_on_this_machine_brings_gpu_nodes_up_from_zero_for_a_job_and_down_after_the_idle_timeout():
    """8 tasks that each need a GPU (local_gpu: 1, 1 CPU) on 4-CPU local nodes: two gpu_train nodes, the YAML's
    maximum, from zero; then back to zero 15 s after they are idle (--idle-timeout-minutes 0.25 for the
    YAML's 10 minutes)."""
    command = [sys.executable, "-m", "gram_ray", "cluster", "local", "cluster/aws.yaml"]
    command += ["--idle-timeout-minutes", "0.25", "--job", "python tests/local_gpu_job.py"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert f"gpu_train (g6e.12xlarge): CPU 48, GPU 4 -> CPU 4, {LOCAL_GPU} 4" in output  # the mapping, printed
    assert ": SUCCEEDED" in output
    shown = output[output.index("--- the end of the job's output (SUCCEEDED) ---") :]
    assert re.search(r"\['[0-9a-f]{20,}'", shown.split("--- end ---")[0])  # what the job printed: its GPU nodes
    timeline = output[output.index("node timeline:") :]
    assert "gpu_train: at most 2 node(s) at once; 0 left at the end" in timeline, output[-3000:]
    assert "cpu_decode" not in timeline  # nothing asked for a decode node
    ups = [float(t) for t in re.findall(r"at (\d+) s a gpu_train node came up", timeline)]
    downs = [float(t) for t in re.findall(r"at (\d+) s a gpu_train node went away", timeline)]
    assert len(ups) == len(downs) == 2 and min(downs) - max(ups) >= 15  # not before the idle timeout
    print(output[-3000:])


def _job(script: str, config: str, out: Path, data: dict, bucket: str, *extra: str) -> str:
    """A job command line: the demo's model on the bucket's data, caches and runs in the bucket, each trainer
    worker asking for one whole simulated GPU node's worth of `local_gpu` or one of them."""
    sets = [
        f"data.train_annotations={data['train']}",
        f"data.val_annotations={data['val']}",
        f"data.video_dir={data['videos']}",
        f"data.audio_dir={data['audios']}",
        f"data.cache_dir={bucket}/cache",
        f"run.storage_path={bucket}/runs",
        "scaling.use_gpu=false",
        "train.batch_size=4",
        "train.warmup_steps=2",
        "train.log_every_steps=2",
        "wandb.enabled=false",
        *extra,
    ]
    return f"python {script} --config {config} --out {out} " + " ".join(f"--set '{s}'" for s in sets)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.cluster_e2e
def test_aws_yaml_on_this_machine_scales_the_gpu_nodes_for_a_training_job_and_a_sweep_then_back_to_zero(
    s3, synth_small, tmp_path
):
    """`ray job submit` of jobs/train.py (2 workers, one local_gpu each) and jobs/tune.py (4 trials, 2 at a
    time, each worker holding a whole 4-GPU node) against a local cluster shaped like aws.yaml, media and
    everything else in a bucket: the GPU node type comes up from 0 for the training job, reaches the YAML's
    maximum (2) for the sweep, and is back at 0 after the idle timeout (shortened to 15 s)."""
    data = s3.upload_dataset(synth_small)
    bucket = s3.bucket_of(data)
    train = _job(
        "jobs/train.py", "configs/demo.yaml", tmp_path / "train", data, bucket,
        "train.epochs=2", "scaling.num_workers=2", f"scaling.resources_per_worker={{CPU: 1, {LOCAL_GPU}: 1}}",
    )  # fmt: skip
    sweep = _job(
        "jobs/tune.py", "configs/tune-demo.yaml", tmp_path / "sweep", data, bucket,
        "train.epochs=1", "train.eval_every_epochs=1", "scaling.num_workers=1",
        f"scaling.resources_per_worker={{CPU: 1, {LOCAL_GPU}: 4}}",
        "tune.num_samples=4", "tune.max_concurrent_trials=2",
    )  # fmt: skip
    command = [sys.executable, "-m", "gram_ray", "cluster", "local", "cluster/aws.yaml"]
    command += ["--idle-timeout-minutes", "0.25", "--settle-s", "300", "--job", train, "--job", sweep]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert f"gpu_train (g6e.12xlarge): CPU 48, GPU 4 -> CPU 4, {LOCAL_GPU} 4" in output  # the mapping, printed
    assert output.count(": SUCCEEDED") == 2
    timeline = output[output.index("node timeline:") :]
    assert "gpu_train: at most 2 node(s) at once; 0 left at the end" in timeline, output[-3000:]
    assert re.search(r"cpu_decode: at most \d+ node\(s\) at once; 0 left at the end", timeline)  # decoding's too
    events = re.findall(r"at (\d+) s a gpu_train node (came up|went away)", timeline)
    assert events[0][1] == "came up" and events[-1][1] == "went away"  # from 0, back to 0
    # A node may leave between the two jobs (the training job's node idles while the sweep's trials queue), but
    # never before the idle timeout: every departure comes >= 15 s after the latest arrival before it.
    last_up = None
    for at, what in events:
        if what == "came up":
            last_up = float(at)
        else:
            assert float(at) - last_up >= 15, timeline
    trials = (tmp_path / "sweep" / "trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 4 and (tmp_path / "sweep" / "best_config.yaml").is_file()
    print(timeline)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.cluster_e2e
def test_a_wrong_weights_path_fails_the_job_in_a_minute_with_no_gpu_node_launched(synth_small, tmp_path):
    """jobs/train.py on a cluster shaped like aws.yaml with model.init_from where no node has it: the driver's check
    runs on a CPU node (the head schedules nothing: a cpu_decode node comes up for it) and the job fails there, in
    one line, before a clip is decoded or a GPU node is asked for."""
    weights = tmp_path / "weights" / "gram-pretrained"
    sets = [*synth_data(synth_small), f"model.init_from={weights}", "wandb.enabled=false", "scaling.use_gpu=false",
            f"scaling.resources_per_worker={{CPU: 1, {LOCAL_GPU}: 1}}"]  # fmt: skip
    job = f"python jobs/train.py --config configs/demo.yaml --out {tmp_path / 'run'} "
    job += " ".join(f"--set '{s}'" for s in sets)
    command = [sys.executable, "-m", "gram_ray", "cluster", "local", "cluster/aws.yaml"]
    command += ["--idle-timeout-minutes", "0.25", "--settle-s", "30", "--job", job]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-5000:]
    failed = re.search(r": FAILED (\d+\.\d) s after its submission", output)
    assert failed and float(failed.group(1)) < 60, output[-5000:]
    shown = output[output.index("--- the end of the job's output (FAILED) ---") :].split("--- end ---")[0]
    assert f"Error: model.init_from={weights}: no such folder." in shown and "(checked on a CPU node" in shown
    assert "Traceback" not in shown and "decod" not in shown.lower()
    timeline = output[output.index("node timeline:") :]
    assert "gpu_train" not in timeline, timeline  # no GPU node was launched
    print(failed.group(0), timeline)

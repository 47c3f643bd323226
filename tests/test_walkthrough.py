"""The cluster walkthrough runs as written: the commands of cluster/README.md's launcher section, read from the page
itself, run against `gram-ray cluster local cluster/aws.yaml` (Ray's autoscaler, local nodes shaped like the
YAML's) with the local S3 server as the bucket. Substituted, and nothing else: the bucket's name, the config (a
small one with GRAM's encoder kinds at tiny sizes, on synthetic clips, in place of the user's GPU recipe; the
README's own YAML gives its bucket paths), the downloaded GRAM checkpoint (one in GRAM's layout, at tiny sizes),
and `ray up` / `ray down` (for `cluster local`). Every job must end SUCCEEDED, the training job must find the
caches the preprocess jobs wrote and decode nothing, and the trained checkpoint must evaluate from the bucket.

About 6 minutes on 2 cores: in `make test-cluster` (marker cluster_e2e)."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import gram_layout_checkpoint, tiny_recipe

from gram_ray import storage
from gram_ray.cluster.local import LOCAL_GPU
from gram_ray.config import save_config
from gram_ray.data.manifest import read_annotations
from gram_ray.data.text import build_word_vocab

REPO = Path(__file__).resolve().parents[1]
SECTION = ("## AWS or GCP with the cluster launcher", "### From a Docker image")
CONFIG = "configs/my-msrvtt.yaml"
# The lines of the walkthrough the local cluster stands in for (token set-up, the launcher, the tunnel).
STANDS_IN = (
    "source .venv/bin/activate",
    "export RAY_AUTH_MODE=token",
    "ray get-auth-token --generate",
    "ray up cluster/aws.yaml",
    "ray dashboard cluster/aws.yaml &",
    "export RAY_ADDRESS=http://127.0.0.1:8265",
    "ray down cluster/aws.yaml",
)


def walkthrough() -> tuple[dict, list[str]]:
    """(the config the page has the user write, the page's shell commands in order: continued lines joined,
    comments dropped)."""
    text = (REPO / "cluster" / "README.md").read_text()
    section = text[text.index(SECTION[0]) : text.index(SECTION[1])]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    (config,) = [yaml.safe_load(body) for kind, body in blocks if kind == "yaml"]
    commands = []
    for kind, body in blocks:
        if kind == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line:
                    commands.append(re.sub(r"\s+", " ", line))
    return config, commands


def test_the_walkthrough_names_one_bucket_layout_and_its_commands_are_known():
    """What the runner below relies on, checked on every `make test`: the config extends GRAM's MSR-VTT recipe and
    every path in the commands is one the config writes or reads."""
    config, commands = walkthrough()
    assert config["extends"] == "msrvtt.yaml"
    assert config["model"]["init_from"] == "s3://YOUR-BUCKET/weights/gram-pretrained"
    assert config["data"]["cache_dir"].startswith("s3://YOUR-BUCKET/")
    for command in commands:
        assert command in STANDS_IN or _kind(command), f"a command the walkthrough test does not know: {command}"
    assert [_kind(c) for c in commands if _kind(c)] == ["assign", "import", "job", "job", "job", "job", "job"]


def _kind(command: str) -> str | None:
    if re.fullmatch(r"GRAM_CHECKPOINT=\S+", command):
        return "assign"
    if command.startswith("gram-ray import-checkpoint $GRAM_CHECKPOINT "):
        return "import"
    if command.startswith("ray job submit --working-dir . -- python jobs/"):
        return "job"
    return None


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.cluster_e2e
def test_the_cluster_walkthrough_runs_as_written(s3, synth_small, tmp_path):
    readme_config, commands = walkthrough()
    bucket = s3.bucket()  # s3://<name>
    name = bucket.removeprefix("s3://")
    data = s3.upload_dataset(synth_small)  # the clips, in the bucket
    mine = yaml.safe_load(yaml.safe_dump(readme_config).replace("YOUR-BUCKET", name))

    # The small config in place of the user's: GRAM's encoder kinds at tiny sizes, the bucket's paths from the page.
    vocab = build_word_vocab(c for r in read_annotations(synth_small["train"]) for c in r.captions)
    cfg = tiny_recipe(
        REPO / "configs" / "msrvtt.yaml",
        len(vocab),
        f"data.train_annotations={data['train']}",
        f"data.val_annotations={data['val']}",
        f"data.video_dir={data['videos']}",
        f"data.audio_dir={data['audios']}",
        f"data.cache_dir={mine['data']['cache_dir']}",
        f"model.init_from={mine['model']['init_from']}",
        f"run.storage_path={mine['run']['storage_path']}",
        "train.epochs=2",
        "train.eval_every_epochs=1",
        "train.evals_per_run=null",
        "data.materialize=never",
        "scaling.num_workers=2",
        f"scaling.resources_per_worker={{CPU: 1, {LOCAL_GPU}: 1}}",  # a GPU of a gpu_train node, locally
        "tune.num_samples=1",
        "tune.max_concurrent_trials=1",
        "tune.search_space={train.lr: {grid: [1.0e-3, 1.0e-4]}}",
    )
    work = tmp_path / "checkout"  # the repository as the user has it, with their config in it
    shutil.copytree(REPO / "jobs", work / "jobs")
    shutil.copytree(REPO / "configs", work / "configs")
    save_config(cfg, work / CONFIG)
    gram = tmp_path / "model_step_100.pt"
    gram_layout_checkpoint(cfg, gram)

    jobs = []
    for command in commands:
        kind = _kind(command)
        if kind == "import":
            args = shlex.split(command.replace("$GRAM_CHECKPOINT", str(gram)).replace("YOUR-BUCKET", name))
            done = subprocess.run(
                [sys.executable, "-m", "gram_ray", *args[1:]], cwd=work, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, done.stdout + done.stderr
        elif kind == "job":
            jobs.append(command.split(" -- ", 1)[1].replace("YOUR-BUCKET", name))
    run = storage.join(mine["run"]["storage_path"], cfg.run.name)
    assert storage.exists(storage.join(mine["model"]["init_from"], "state.pt"))  # the import, in the bucket

    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "gram_ray", "cluster", "local", str(REPO / "cluster" / "aws.yaml")]
    command += ["--idle-timeout-minutes", "0.25", "--settle-s", "0", "--logs", str(logs)]  # scale-down: elsewhere
    command += [a for job in jobs for a in ("--job", job)]
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=1500)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert output.count(": SUCCEEDED ") == len(jobs) == 5, output[-5000:]
    preprocess_train, preprocess_val, train, evaluate, sweep = (
        (logs / f"job-{i}.log").read_text() for i in range(1, 6)
    )
    cache = mine["data"]["cache_dir"]
    assert f"into {cache}/train/shards" in preprocess_train and f"into {cache}/val/shards" in preprocess_val
    for log in (train, sweep):  # the caches the preprocess jobs wrote: training decodes nothing
        assert f"cache hit: {cache}/train already holds these" in log, log[-3000:]
        assert f"into {cache}/train/shards" not in log, log[-3000:]
    assert f"cache hit: {cache}/val already holds these" in train
    result = storage.read_json(storage.join(run, "result.json"))
    assert result["checkpoint"].startswith(run) and "R@1" in evaluate  # the best checkpoint, from the bucket
    assert storage.exists(storage.join(mine["run"]["storage_path"], f"{cfg.run.name}-sweep", "trials.csv"))
    timeline = output[output.index("node timeline:") :]
    assert "a gpu_train node came up" in timeline, timeline  # the training ran on the GPU group, from zero
    print(timeline)


def _blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)


def test_the_readmes_path_is_the_walkthroughs_and_its_cluster_check_runs_as_printed(tmp_path):
    """README.md's "From your files to a cluster job" shows the walkthrough's config and commands (which the test
    above runs): the same YAML, each command one of the walkthrough's; its `cluster check` runs here, as printed,
    on that config."""
    import textwrap

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## From your files to a cluster job") : readme.index("## Search what you trained")]
    blocks = [(kind, textwrap.dedent(body)) for kind, body in _blocks(section)]
    config, commands = walkthrough()
    (mine,) = [yaml.safe_load(body) for kind, body in blocks if kind == "yaml"]
    assert mine == config
    shown = [
        re.sub(r"\s+", " ", line.strip())
        for kind, body in blocks
        if kind == "bash"
        for line in body.replace("\\\n", " ").splitlines()
        if line.strip()
    ]
    check = "gram-ray cluster check --yaml cluster/aws.yaml --config configs/my-msrvtt.yaml"
    assert check in shown and all(line in commands or line == check for line in shown), shown
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / CONFIG).write_text(yaml.safe_dump(config))
    (tmp_path / "cluster").symlink_to(REPO / "cluster")
    done = subprocess.run(
        [sys.executable, "-m", "gram_ray", *shlex.split(check)[1:]], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trainer workers: 4 x {'CPU': 1.0, 'GPU': 1.0} on node type gpu_train" in done.stdout
    assert "warning" not in done.stdout  # the workers run as the bucket-only identity


@pytest.mark.ray
def test_preprocess_split_writes_the_cache_training_reads(synth_small, tmp_path, ray_session):
    """`preprocess --config C --split S` decodes what C's training run would, where it reads it: the run then
    decodes nothing."""
    from click.testing import CliRunner
    from tiny import synth_data, tiny_config

    from gram_ray.cli import main
    from gram_ray.train.datasets import decode_caches
    from gram_ray.train.layout import RunLayout

    cfg = tiny_config(*synth_data(synth_small), f"data.cache_dir={tmp_path / 'cache'}", "data.video.train_draws=2")
    save_config(cfg, tmp_path / "c.yaml")
    for split in ("train", "val"):
        done = CliRunner().invoke(main, ["preprocess", "--config", str(tmp_path / "c.yaml"), "--split", split])
        assert done.exit_code == 0, done.output
        assert f"into {tmp_path / 'cache' / split / 'shards'}" in done.output
    lines = []
    decode_caches(cfg, RunLayout.of(cfg, tmp_path / "run"), log=lines.append)
    assert [line.split(" already")[0] for line in lines] == [
        f"cache hit: {tmp_path / 'cache' / 'train'}",
        f"cache hit: {tmp_path / 'cache' / 'val'}",
    ]
    mixed = CliRunner().invoke(main, ["preprocess", "--config", str(tmp_path / "c.yaml"), "--split", "train",
                                      "--annotations", synth_small["train"]])  # fmt: skip
    assert mixed.exit_code == 2 and "--split takes the annotations" in mixed.output
    save_config(tiny_config(*synth_data(synth_small)), tmp_path / "nowhere.yaml")
    nowhere = CliRunner().invoke(main, ["preprocess", "--config", str(tmp_path / "nowhere.yaml"), "--split", "val"])
    assert nowhere.exit_code == 2 and "set run.storage_path" in nowhere.output

"""Before paying: what a job reads and writes is checked before any clip is decoded or any GPU is asked for, each
problem one `Error:` line naming the key, the value and what to do (cluster/preflight.py). The run on a local
autoscaling cluster shaped like aws.yaml, where no GPU node may start, is in test_cluster_local.py."""

from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import synth_data

from gram_ray import storage
from gram_ray.cli import main
from gram_ray.cluster.preflight import Need, PreflightError, check_here, check_on_cluster, needs_of_config, problems
from gram_ray.config import DataConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_a_recipe_needs_its_data_its_starting_weights_and_somewhere_to_write():
    cfg = load_config(CONFIGS / "msrvtt.yaml", ["run.storage_path=s3://bucket/runs"])
    needs = {n.key: n for n in needs_of_config(cfg)}
    assert set(needs) == {
        "data.train_annotations", "data.val_annotations", "data.video_dir", "model.init_from", "run.storage_path",
    }  # fmt: skip
    assert needs["model.init_from"].kind == "checkpoint" and needs["run.storage_path"].kind == "writable"
    # Without init_from the encoders' own files are read: GRAM's two are files; BERT is a Hugging Face name.
    own = {n.key: n.value for n in needs_of_config(load_config(CONFIGS / "msrvtt.yaml", ["model.init_from=null"]))}
    assert own["model.vision.pretrained"] == "/weights/EVA01_CLIP_g_14_psz14_s11B.pt"
    assert own["model.audio.pretrained"] == "/weights/BEATs_iter3_plus_AS2M.pt"
    assert "model.text.pretrained" not in own and "model.init_from" not in own
    hf = {n.key for n in needs_of_config(load_config(CONFIGS / "msrvtt-hf.yaml"))}
    assert not any(key.endswith(".pretrained") for key in hf)  # openai/clip-..., MIT/ast-...-0.4593: hub names


def test_each_problem_is_one_line_naming_the_key_the_value_and_what_to_do(tmp_path):
    (tmp_path / "imported").mkdir()
    (tmp_path / "a-file").write_text("x")
    needs = [
        Need("model.init_from", str(tmp_path / "nope"), "checkpoint"),
        Need("model.init_from", str(tmp_path / "imported"), "checkpoint"),
        Need("model.vision.pretrained", str(tmp_path / "EVA.pt"), "weights"),
        Need("data.video_dir", str(tmp_path / "a-file"), "dir"),
        Need("run.storage_path", str(tmp_path / "a-file" / "runs"), "writable"),
        Need("data.train_annotations", str(tmp_path / "train.json"), "inputs"),
        Need("run.storage_path", str(tmp_path / "runs"), "writable"),  # fine: made, written and cleaned
    ]
    lines = problems(needs, DataConfig())
    assert len(lines) == 6 and all("\n" not in line for line in lines)
    for need, line in zip(needs, lines, strict=False):
        assert line.startswith(f"{need.key}={need.value}: "), line
    assert "no such folder" in lines[0] and "no state.pt" in lines[1] and "import-checkpoint" in lines[1]
    assert "no such file" in lines[2] and "a file, not a folder" in lines[3] and "Not a directory" in lines[4]
    assert "does not exist" in lines[5]
    assert list((tmp_path / "runs").iterdir()) == []  # the write check left nothing behind


def test_the_write_check_writes_and_deletes_one_object_in_the_bucket(s3):
    bucket = s3.bucket()
    assert problems([Need("run.storage_path", f"{bucket}/runs", "writable")], DataConfig()) == []
    assert storage.list_names(f"{bucket}/runs") == []  # the probe object written, then deleted
    missing = problems([Need("run.storage_path", "s3://no-such-bucket-here/runs", "writable")], DataConfig())
    assert len(missing) == 1 and missing[0].startswith("run.storage_path=s3://no-such-bucket-here/runs: cannot reach")


def test_a_wrong_weights_path_stops_train_before_a_clip_is_decoded(synth_small, tmp_path, ray_session):
    out = tmp_path / "run"
    args = ["train", "--config", str(CONFIGS / "demo.yaml"), "--out", str(out)]
    args += [f"--set={s}" for s in [*synth_data(synth_small), f"model.init_from={tmp_path}/gram-pretrained"]]
    args += ["--set=wandb.enabled=false"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: model.init_from={tmp_path}/gram-pretrained: no such folder. Give a gram-ray checkpoint folder "
        "(`gram-ray import-checkpoint` makes one from GRAM's weights)."
    )
    assert not out.exists()  # no cache decoded, no run folder: nothing started


def test_several_problems_are_several_error_lines(tmp_path, s3):
    (tmp_path / "folder").mkdir()
    args = ["index", "--checkpoint", str(tmp_path / "folder"), "--data", str(tmp_path / "nope")]
    result = CliRunner().invoke(main, [*args, "--out", f"{s3.bucket()}/index"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert [e.split("=")[0] for e in errors] == ["Error: --checkpoint", "Error: --data"], result.output


def test_on_a_cluster_local_paths_are_checked_by_a_cpu_task_uris_by_the_driver(tmp_path, monkeypatch, ray_session):
    """With RAY_ADDRESS (a submitted job), the driver checks URIs only; the local paths are checked in a Ray task
    that asks for CPU and no GPU: where the workers will read them."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # only read by on_cluster(); Ray is already up here
    local = Need("model.init_from", str(tmp_path / "nope"), "checkpoint")
    uri = Need("run.storage_path", "s3://no-such-bucket-here/runs", "writable")
    with pytest.raises(PreflightError) as driver:
        check_here([local, uri], DataConfig())
    assert driver.value.lines[0].startswith("run.storage_path=") and len(driver.value.lines) == 1
    assert check_here([local], DataConfig()) == [local]  # left for the cluster
    with pytest.raises(PreflightError) as node:
        check_on_cluster([local], DataConfig())
    assert node.value.lines == [problems([local], DataConfig())[0] + " (checked on a CPU node of the cluster)"]

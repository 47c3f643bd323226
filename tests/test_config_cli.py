import json

import pytest
from click.testing import CliRunner

from gram_ray.cli import main
from gram_ray.config import ConfigError, load_config


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  video:\n    num_frames: 4\n")
    cfg = load_config(path, ["data.video.size=96", "data.audio.missing=silence"])
    assert (cfg.data.video.num_frames, cfg.data.video.size, cfg.data.audio.missing) == (4, 96, "silence")


def test_the_audio_key_before_missing_still_reads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  audio: {allow_missing: true}\n")
    assert load_config(path).data.audio.missing == "silence"
    assert load_config(None, ["data.audio.allow_missing=false"]).data.audio.missing == "skip"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.video.num_frame=4"], "data.video.num_frame: unknown key"),
        (["data.video.size=big"], "data.video.size"),
        (["data.max_failure_share=2"], "data.max_failure_share"),
        (["data.video"], "expected key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_synth_then_preprocess_commands(tmp_path, ray_session):
    runner = CliRunner()
    result = runner.invoke(main, ["synth", "--out", str(tmp_path / "s"), "--n", "16", "--size", "32"])
    assert result.exit_code == 0, result.output
    paths = json.loads(result.output[result.output.index("{") :])
    args = ["preprocess", "--annotations", paths["val"], "--video-dir", paths["videos"], "--audio-dir", paths["audios"]]
    args += ["--out", str(tmp_path / "cache"), "--set", "data.video.size=32", "--set", "data.audio.window_frames=128"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    assert report["rows_written"] == 4 and report["config"]["video"]["size"] == 32
    assert "cache hit" in runner.invoke(main, args).output

    bad = runner.invoke(main, args[:-2] + ["--set", "data.video.sise=32"])
    assert bad.exit_code != 0 and "data.video.sise: unknown key" in bad.output


def test_evaluate_embeddings_command(shared_data, tmp_path):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(
        main, ["evaluate-embeddings", str(shared_data / "gram-msrvtt-embeddings"), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "text-video-audio-subtitles" in result.output
    metrics = json.loads(out.read_text())
    assert metrics["volume"]["text-video-audio"]["t2v"]["R@1"] > 20
    bad = CliRunner().invoke(main, ["evaluate-embeddings", str(tmp_path)])
    assert bad.exit_code != 0 and "no <modality>.npy files" in bad.output

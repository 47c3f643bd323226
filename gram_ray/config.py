"""Typed configuration: pydantic models, loaded from YAML, every key overridable as `--set section.key=value`.

Unknown keys and bad values stop with a message that names the key, so a typo never trains silently with a
default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["ConfigError", "VideoConfig", "AudioConfig", "DataConfig", "GramConfig", "load_config", "apply_overrides"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VideoConfig(_Section):
    num_frames: int = Field(8, ge=1, description="frames per clip, one from each of N equal segments")
    size: int = Field(224, ge=8, description="short side resized to this, then centre-cropped to size x size")


class AudioConfig(_Section):
    sample_rate: int = Field(16000, ge=8000)
    mel_bins: int = Field(64, ge=8)
    frame_length_ms: float = Field(25.0, gt=0)
    frame_shift_ms: float = Field(10.0, gt=0)
    windows: int = Field(1, ge=1, description="A: the filterbank is cut into this many windows")
    window_frames: int = Field(1024, ge=16, description="L: filterbank frames per window (padded or sliced)")
    # The paper's code normalises filterbanks with AudioSet statistics: (fbank - mean) / (2 * std).
    norm_mean: float = 15.41663
    norm_std: float = 6.55582
    silence_threshold: float = Field(1e-4, ge=0, description="peak |amplitude| below this counts as silent")
    allow_missing: bool = Field(
        False, description="keep clips without (audible) audio, flagged has_audio=false, instead of skipping them"
    )


class DataConfig(_Section):
    video: VideoConfig = VideoConfig()
    audio: AudioConfig = AudioConfig()
    max_failure_share: float = Field(
        0.1, ge=0, le=1, description="stop preprocessing when more than this share of clips cannot be decoded"
    )
    decode_on_the_fly: bool = Field(
        False, description="skip the Parquet cache and decode every epoch (train-mode random frames each time)"
    )
    shard_mb: float = Field(
        32,
        gt=0,
        description="decoded megabytes per Parquet file; a writer buffers about this much (times ~15 in Arrow and "
        "Parquet copies) before writing, so it bounds each decode worker's memory",
    )
    decode_batch_size: int = Field(4, ge=1, description="clips per Ray Data decode task batch")


class GramConfig(_Section):
    data: DataConfig = DataConfig()


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `key.sub=value` strings; values are parsed as YAML (so 2e-5, true, [a, b] work)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set data.video.num_frames=4")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see gram_ray/config.py for the keys)")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> GramConfig:
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    apply_overrides(tree, overrides)
    try:
        return GramConfig.model_validate(tree)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}:\n{_describe(e)}") from None

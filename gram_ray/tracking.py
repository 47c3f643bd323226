"""Experiment tracking: W&B on rank 0, plus a local metrics.jsonl that the demo's plots read.

With no API key W&B runs offline into the run's output folder (sync later with `wandb sync`): it never
prompts or blocks. `wandb.enabled: false` (or WANDB_MODE=disabled) turns it off. The key is read by wandb from
its own environment / netrc; it is never put in a config, log or checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gram_ray.config import GramConfig

__all__ = ["Tracker", "wandb_mode"]


def wandb_mode(cfg: GramConfig) -> str:
    if not cfg.wandb.enabled or os.environ.get("WANDB_MODE") == "disabled":
        return "disabled"
    if cfg.wandb.mode != "auto":
        return cfg.wandb.mode
    if os.environ.get("WANDB_MODE") in ("online", "offline"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc()
    return "online" if has_key else "offline"


def _netrc() -> str:
    try:
        return (Path.home() / ".netrc").read_text()
    except OSError:
        return ""


class Tracker:
    def __init__(self, cfg: GramConfig, output_dir: Path, enabled: bool = True, resume: bool = False) -> None:
        self.enabled = enabled
        self.run = None
        self.metrics_path = Path(output_dir) / "metrics.jsonl"
        if not enabled:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(cfg)
        if mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                group=cfg.wandb.group,
                tags=cfg.wandb.tags,
                name=cfg.run.name,
                config=cfg.model_dump(mode="json"),
                dir=str(output_dir),
                mode=mode,
                resume="allow" if resume else None,
                settings=wandb.Settings(silent=True, console="off"),
            )

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(numeric) + "\n")
        if self.run is not None:
            self.run.log(numeric, step=int(numeric.get("step", 0)))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

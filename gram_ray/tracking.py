"""Experiment tracking: W&B on rank 0, plus a metrics.jsonl that the demo's plots read, both kept on the run's
storage so that they outlive the node rank 0 ran on.

- **The key.** Rank 0 runs on whatever node Ray Train placed it (a GPU node on a cluster), whose environment has
  no W&B key. The driver reads it where the user keeps it (WANDB_API_KEY, else the entry of W&B's host in ~/.netrc
  or $NETRC, read with the standard library's netrc parser; the host is WANDB_BASE_URL's, for a self-hosted W&B)
  with WANDB_BASE_URL, WANDB_ENTITY and WANDB_PROJECT (`wandb_credentials`), puts them in Ray's object store
  (`ray.put`) and hands rank 0 the reference: the key is in no config, environment variable, log, checkpoint, job
  runtime environment or train_loop_config that `ray job list` or the dashboard shows, and rank 0 gives it to
  wandb.init's settings, not to its environment. Without a key W&B runs offline (sync later with `wandb sync`): it
  never prompts or blocks. `wandb.enabled: false` (or WANDB_MODE=disabled) turns it off.
- **One run across restarts.** The W&B run id is decided once per training run and kept beside its checkpoints
  (`<run root>/wandb-run-id`): a worker-group restart, a preemption or `--resume auto` continues the same W&B run
  (a sweep's trial: its trial id).
- **Outliving the node.** With run.storage_path, rank 0 copies metrics.jsonl and its W&B run folder to the run's
  storage (`<run root>/metrics.jsonl`, `<run root>/wandb/`) at every checkpoint and at the end: a node that goes
  loses at most one checkpoint interval of logs.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

from gram_ray import storage
from gram_ray.config import GramConfig

__all__ = [
    "Tracker",
    "wandb_mode",
    "wandb_credentials",
    "wandb_run_id",
    "RUN_ID_FILE",
    "METRICS_FILE",
    "WANDB_FOLDER",
]

RUN_ID_FILE = "wandb-run-id"
METRICS_FILE = "metrics.jsonl"
WANDB_FOLDER = "wandb"
_SETTINGS_FROM_ENV = ("WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT")
_DEFAULT_HOST = "api.wandb.ai"


def _netrc_key(host: str) -> str | None:
    """The password of host's entry in the netrc file W&B itself reads ($NETRC, else ~/.netrc), if any."""
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry and entry[2] else None


def wandb_credentials(environ: dict | None = None) -> dict[str, str]:
    """What rank 0's W&B client needs from the submitting side: WANDB_API_KEY (from the environment, else the netrc
    entry of W&B's host), WANDB_BASE_URL, WANDB_ENTITY, WANDB_PROJECT; only those that are set."""
    environ = os.environ if environ is None else environ
    found = {name: environ[name] for name in _SETTINGS_FROM_ENV if environ.get(name)}
    host = urlparse(found.get("WANDB_BASE_URL", "")).hostname or _DEFAULT_HOST
    key = environ.get("WANDB_API_KEY") or _netrc_key(host)
    if key:
        found["WANDB_API_KEY"] = key
    return found


def wandb_mode(cfg: GramConfig, credentials: dict | None = None) -> str:
    """disabled, online or offline: online when a key is at hand (wandb.mode: auto)."""
    if not cfg.wandb.enabled or os.environ.get("WANDB_MODE") == "disabled":
        return "disabled"
    if cfg.wandb.mode != "auto":
        return cfg.wandb.mode
    if os.environ.get("WANDB_MODE") in ("online", "offline"):
        return os.environ["WANDB_MODE"]
    credentials = wandb_credentials() if credentials is None else credentials
    return "online" if credentials.get("WANDB_API_KEY") else "offline"


def wandb_run_id(run_root: str, continuing: bool) -> str:
    """The W&B run id of the training run under run_root: the one kept there when the run continues (a restart,
    --resume), else a new one, kept there for the restarts to come."""
    path = storage.join(run_root, RUN_ID_FILE)
    if continuing and storage.exists(path):
        return storage.read_text(path).strip()
    run_id = secrets.token_hex(4)  # W&B's own ids are 8 characters of [a-z0-9]
    storage.write_text(path, run_id + "\n")
    return run_id


class Tracker:
    """Rank 0's record of a run: metrics.jsonl and the W&B run in `output_dir` on this node, copied to `sync_to`
    (the run's storage) by sync()."""

    def __init__(
        self,
        cfg: GramConfig,
        output_dir: Path,
        enabled: bool = True,
        resume: bool = False,
        run_id: str | None = None,
        credentials: dict | None = None,
        sync_to: str | None = None,
        mode: str | None = None,
    ) -> None:
        """mode: W&B's mode as the driver decided it (tracking_options); None: decided here (wandb_mode)."""
        self.enabled = enabled
        self.run = None
        self.output_dir = Path(output_dir)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.sync_to = sync_to
        if not enabled:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if sync_to is not None and not self.metrics_path.exists():  # rank 0 restarted on another node: go on
            remote = storage.join(sync_to, METRICS_FILE)  # from the lines the run's storage has
            if storage.exists(remote):
                self.metrics_path.write_bytes(storage.read_bytes(remote))
        credentials = wandb_credentials() if credentials is None else credentials
        mode = mode or wandb_mode(cfg, credentials)
        if mode != "disabled":
            import wandb

            settings = {"silent": True, "console": "off"}
            if credentials.get("WANDB_API_KEY"):
                settings["api_key"] = credentials["WANDB_API_KEY"]
            if credentials.get("WANDB_BASE_URL"):
                settings["base_url"] = credentials["WANDB_BASE_URL"]
            self.run = wandb.init(
                project=cfg.wandb.project or credentials.get("WANDB_PROJECT") or "gram-ray",
                entity=cfg.wandb.entity or credentials.get("WANDB_ENTITY"),
                group=cfg.wandb.group,
                tags=cfg.wandb.tags,
                name=cfg.run.name,
                id=run_id,
                config=cfg.model_dump(mode="json"),
                dir=str(self.output_dir),
                mode=mode,
                resume="allow" if (resume or run_id) else None,
                settings=wandb.Settings(**settings),
            )

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(numeric) + "\n")
        if self.run is not None:
            self.run.log(numeric, step=int(numeric.get("step", 0)))

    def sync(self) -> None:
        """metrics.jsonl and the W&B run folder(s) copied to the run's storage, replacing the earlier copies: a
        snapshot (W&B's run file is read as far as it is written; its reader stops at a record cut off)."""
        if not self.enabled or self.sync_to is None:
            return
        if self.metrics_path.is_file():
            storage.put_bytes(storage.join(self.sync_to, METRICS_FILE), self.metrics_path.read_bytes())
        folder = self.output_dir / WANDB_FOLDER
        # The run folders' own files only: wandb's latest-run and debug.log are symbolic links to them.
        for top, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(top, d))]
            for name in files:
                path = Path(top, name)
                if not path.is_symlink():
                    remote = storage.join(self.sync_to, WANDB_FOLDER, *path.relative_to(folder).parts)
                    storage.put_bytes(remote, path.read_bytes())

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
        self.sync()

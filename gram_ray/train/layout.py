"""One run's layout, decided once: where its checkpoints, caches and result files live.

Local runs keep everything under the output folder. With `run.storage_path` (shared or cloud storage, for
clusters) everything other nodes need lives under <storage_path>/<run.name>/ and the driver's output folder
keeps copies of the result files for the user at hand.

  <output>/config.yaml, result.json, metrics.jsonl, wandb/        the driver's view (always local)
  <storage_path or output/ray>/<run.name>/checkpoint_*            Ray Train's run folder
  <data.cache_dir or run root/cache or output/cache>/{train,val}  the Parquet caches
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gram_ray import storage
from gram_ray.config import GramConfig

__all__ = ["RunLayout"]


@dataclass(frozen=True)
class RunLayout:
    output_dir: Path  # the driver's folder
    storage_path: str  # Ray Train's RunConfig.storage_path (a local path or a URI)
    run_root: str  # <storage_path>/<run.name>: checkpoints, and shared copies of the result files
    cache_root: str  # <cache_root>/train, <cache_root>/val
    shared: bool  # run.storage_path was given: copy results beside the checkpoints

    @classmethod
    def of(cls, cfg: GramConfig, output_dir: str | Path) -> RunLayout:
        output_dir = Path(output_dir).resolve()
        storage_path = storage.absolute(cfg.run.storage_path or output_dir / "ray")
        run_root = storage.join(storage_path, cfg.run.name)
        if cfg.data.cache_dir:
            cache_root = storage.absolute(cfg.data.cache_dir)
        elif cfg.run.storage_path:  # every node reads the cache: it lives beside the checkpoints
            cache_root = storage.join(run_root, "cache")
        else:
            cache_root = str(output_dir / "cache")
        return cls(output_dir, storage_path, run_root, cache_root, shared=bool(cfg.run.storage_path))

    def cache(self, split: str) -> str:
        return storage.join(self.cache_root, split)

    @property
    def metrics(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def write_result(self, name: str, text: str) -> None:
        """A result file in the output folder, and beside the checkpoints on shared storage (the driver's folder
        may be gone with the head node)."""
        storage.write_text(self.output_dir / name, text)  # written beside and renamed: never read cut off
        if self.shared:
            storage.write_text(storage.join(self.run_root, name), text)

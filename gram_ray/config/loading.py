"""Loading a configuration: YAML files (with `extends:`), `--set section.key=value` overrides, and one message
naming every bad key and value, so a typo never trains silently with a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gram_ray.config.sections import GramConfig

__all__ = ["ConfigError", "apply_overrides", "load_config", "read_yaml_mapping", "save_config"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and what to do."""


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
    """Every problem pydantic found, on one line: `key: what is wrong (got value); ...`."""
    problems = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key (check the spelling; see docs/config-reference.md for the keys)")
        else:
            got = f" (got {e.get('input')!r})" if not isinstance(e.get("input"), dict) else ""  # not a whole section
            problems.append(f"{key or 'config'}: {e['msg']}{got}")
    return "; ".join(problems)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (a config, a cluster YAML), or a ConfigError that names the file and says in
    one line what is wrong: missing, a folder, unreadable, not text, not valid YAML (where), not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file: is it the right file?") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {problem}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys, got {type(tree).__name__}")
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file's mapping; `extends: other.yaml` (relative to the file) is read first and deep-merged under it."""
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} extends itself through {' -> '.join(map(str, seen))}")
    tree = read_yaml_mapping(path, "config file")
    parent = tree.pop("extends", None)
    if parent:
        tree = _merge(_read_tree(path.parent / parent, (*seen, path.resolve())), tree)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> GramConfig:
    tree: dict[str, Any] = _read_tree(Path(path)) if path is not None else {}
    apply_overrides(tree, overrides)
    try:
        return GramConfig.model_validate(tree)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}: {_describe(e)}") from None


def save_config(cfg: GramConfig, path: str | Path) -> None:
    """A complete YAML that load_config reads back to the same config."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

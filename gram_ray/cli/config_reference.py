"""The configuration reference, generated from the typed config itself: every key `--set` accepts, with its type,
its default and its description (`gram-ray config-reference` prints it; docs/config-reference.md is its output,
and a test keeps the two equal, so a key added without a description, or without regenerating the page, fails).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import click
from pydantic import BaseModel

from gram_ray.config import GramConfig

__all__ = ["Key", "config_keys", "reference_markdown", "config_reference"]


@dataclass(frozen=True)
class Key:
    name: str  # dotted, as --set takes it
    type: str
    default: Any
    description: str | None


def _section(annotation) -> type[BaseModel] | None:
    """The config section a field holds (a pydantic model, alone or with None), else None."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    sections = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
    return sections[0] if len(sections) == 1 and len(options) == 1 else None


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def type_name(annotation) -> str:
    """A field's type in words a YAML writer reads: int, float or null, one of "a" | "b", list of str, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "[" + ", ".join(type_name(a) for a in args) + "]"
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"a section like `{_SECTION_KEYS.get(annotation, annotation.__name__)}`"
    return getattr(annotation, "__name__", str(annotation))


# A section type that appears under more than one key is described once, under its first key.
_SECTION_KEYS: dict[type, str] = {}


def config_keys(model: type[BaseModel] = GramConfig, prefix: str = "", defaults: dict | None = None) -> Iterator[Key]:
    """Every leaf key of the config, in the order of the classes' fields, with the defaults a config without that
    key gets (a nested section's default comes from its parent: model.text's pretrained is bert-base-uncased)."""
    defaults = GramConfig().model_dump(mode="json") if defaults is None else defaults
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section(field.annotation)
        if section is not None:
            _SECTION_KEYS.setdefault(section, key)
            yield from config_keys(section, f"{key}.", defaults.get(name) or {})
        else:
            yield Key(key, type_name(field.annotation), defaults.get(name), field.description)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `gram_ray/config/sections.py` by `gram-ray config-reference` (a test keeps this page equal to",
        "its output). Every key below is what `--set` takes (`--set data.video.num_frames=8`) and what a YAML config",
        "holds under its section; values are read as YAML. [configuration.md](configuration.md) says how configs",
        "are read and overridden.",
    ]
    section = None
    for key in config_keys():
        top = key.name.split(".")[0]
        if top != section:
            section = top
            lines += ["", f"## `{top}`", "", "| key | type | default | what |", "| --- | --- | --- | --- |"]
        default = "" if key.default is None else f"`{_cell(json.dumps(key.default))}`"
        lines.append(f"| `{key.name}` | {_cell(key.type)} | {default} | {_cell(key.description or '')} |")
    return "\n".join(lines) + "\n"


@click.command("config-reference")
def config_reference() -> None:
    """Every config key --set takes, with its type, default and description, as Markdown (docs/config-reference.md)."""
    click.echo(reference_markdown(), nl=False)

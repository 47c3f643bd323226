"""Typed configuration: pydantic models (sections.py), loaded from YAML with every key overridable as
`--set section.key=value` (loading.py), and the arithmetic of a step's clips over any world size (world.py).

The root of the package: every other part reads the config, and it imports nothing else of gram-ray's.
"""

from gram_ray.config import loading as _loading
from gram_ray.config import sections as _sections
from gram_ray.config.loading import *  # noqa: F403 (the package's names: each module's __all__)
from gram_ray.config.sections import *  # noqa: F403

__all__ = [*_loading.__all__, *_sections.__all__]

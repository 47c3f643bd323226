"""Leaving clips out by id: the clips of an epoch already trained on (the rest of an epoch a mid-epoch checkpoint was
taken in), the clips another source already put in a search index.

A module of its own, importing only pyarrow: Ray Data pickles a function by its module, and a task worker started
cold after a restart imports that module before its first batch. With the function in train/datasets.py (torch,
transformers), a restarted group waited 8.0 s for its first batch; with a filter importing nothing of gram-ray's,
4.0 s, the rest being the task worker's own start (tests/test_silent_loss.py, 2 cores).
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from gram_ray.data.schema import ID

__all__ = ["id_array", "without_ids"]


def id_array(ids: Iterable[str]) -> pa.Array:
    """Clip ids as the Arrow array without_ids takes: made once by the caller, not in every task or batch."""
    return pa.array(list(ids), pa.string())


def without_ids(batch: pa.Table, ids: pa.Array) -> pa.Table:
    """The batch's rows whose clip id is not among `ids`."""
    return batch.filter(pc.invert(pc.is_in(batch[ID], value_set=ids)))

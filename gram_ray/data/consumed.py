"""Leaving out the clips of an epoch already trained on (the rest of an epoch a mid-epoch checkpoint was taken in).

A module of its own, importing only pyarrow: Ray Data pickles a function by its module, and a task worker started
cold after a restart imports that module before its first batch. With the function in train/datasets.py (torch,
transformers), a restarted group waited 8.0 s for its first batch; with a filter importing nothing of gram-ray's,
4.0 s, the rest being the task worker's own start (tests/test_silent_loss.py, 2 cores).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from gram_ray.data.schema import ID

__all__ = ["without_ids"]


def without_ids(batch: pa.Table, ids: pa.Array) -> pa.Table:
    """The batch's rows whose clip id is not among `ids`."""
    return batch.filter(pc.invert(pc.is_in(batch[ID], value_set=ids)))

"""A mid-epoch checkpoint's record of the clips trained on: bounded by the cache's files, not its clips, and the
rest of the epoch rebuilt from it exactly (every clip not yet trained on, once)."""

import json

import pyarrow as pa
import pytest

from gram_ray.data.epoch_progress import FILE, EpochProgress, rest_of_epoch_filter
from gram_ray.data.schema import ID
from gram_ray.train.state import resumed_progress


def _cache(files: int, rows: int) -> dict[str, int]:
    return {f"shard-{i:05d}.parquet": rows for i in range(files)}


def test_half_an_epoch_of_27m_clips_is_recorded_in_far_under_a_megabyte():
    """VAST-27M's shape: 27 M clips in 10,800 files of 2,500. Half the files trained on whole and 16 in progress
    (8 workers reading 2 each) take a bit a file and the ids of those 16: under 1 MB, where the list of ids it
    replaced held 13.5 M of them (~300 MB as JSON)."""
    file_rows = _cache(10_800, 2_500)
    names = sorted(file_rows)
    progress = EpochProgress(file_rows)
    for name in names[::2]:  # every other file: a shuffled order, not a prefix
        progress.add([name] * 2_500, [f"{name}#{r}" for r in range(2_500)])
    in_progress = names[1:33:2]
    for name in in_progress:
        progress.add([name] * 1_000, [f"{name}#{r}" for r in range(1_000)])
    assert progress.trained == 5_400 * 2_500 + 16 * 1_000 and progress.repeats == 0
    state = json.dumps(progress.to_json())
    assert len(state) < 1_000_000, len(state)
    assert sorted(progress.partial) == in_progress and len(progress.done) == 5_400

    again = EpochProgress.from_json(json.loads(state), file_rows)
    assert (again.done, again.partial, again.trained) == (progress.done, progress.partial, progress.trained)


def test_a_file_is_done_when_every_row_of_it_is_trained_on_and_repeats_are_counted():
    progress = EpochProgress({"a.parquet": 3, "b.parquet": 2})
    progress.add(["a.parquet", "b.parquet", "a.parquet"], ["a0", "b0", "a1"])
    assert progress.done == set() and progress.partial == {"a.parquet": {"a0", "a1"}, "b.parquet": {"b0"}}
    progress.add(["a.parquet", "a.parquet"], ["a2", "a0"])  # a0 a second time: a repeat, not a new clip
    assert progress.done == {"a.parquet"} and "a.parquet" not in progress.partial
    assert (progress.trained, progress.repeats) == (4, 1)
    progress.add(["a.parquet"], ["a1"])  # a clip of a file done whole: a repeat too
    assert progress.repeats == 2
    assert progress.contains(["a.parquet", "b.parquet", "b.parquet"], ["a9", "b0", "b1"]) == [True, True, False]


def test_rows_without_a_known_file_are_kept_by_id():
    """A split decoded on the fly (no files), or a file the cache's report does not name: by id, as before."""
    progress = EpochProgress({"a.parquet": 2})
    progress.add(["", "elsewhere.parquet"], ["x", "y"])
    assert progress.partial == {"": {"x", "y"}} and progress.contains([""], ["y"]) == [True]
    assert EpochProgress(None).to_json()["files"] == 0


def test_a_checkpoint_written_before_files_were_recorded_resumes_by_its_ids():
    old = {"step": 3, "epoch": 1, "epoch_complete": False, "consumed_ids": ["c1", "c2"]}
    progress = resumed_progress(old, {"a.parquet": 2})
    assert progress.ids() == ["c1", "c2"] and progress.done == set()


def test_a_checkpoint_over_another_cache_is_refused_with_what_to_do():
    state = EpochProgress(_cache(4, 2)).to_json()
    with pytest.raises(ValueError, match="over 4 cache files, this run's train cache has 5: it was decoded again"):
        EpochProgress.from_json(state, _cache(5, 2))


def test_the_rest_of_the_epoch_is_every_row_not_trained_on_once():
    file_rows = _cache(3, 4)
    names = sorted(file_rows)
    rows = [(name, f"{name}#{r}") for name in names for r in range(4)]
    progress = EpochProgress(file_rows)
    progress.add([names[1]] * 4, [f"{names[1]}#{r}" for r in range(4)])  # done whole
    progress.add([names[2]] * 2, [f"{names[2]}#0", f"{names[2]}#3"])  # in progress
    batch = pa.table({ID: [i for _, i in rows], FILE: [n for n, _ in rows]})
    done = pa.array(sorted(progress.done), pa.string())
    rest = rest_of_epoch_filter(batch, done, pa.array(progress.ids(), pa.string()))
    want = [i for n, i in rows if not progress.contains([n], [i])[0]]
    assert rest[ID].to_pylist() == want and len(want) == 4 + 2

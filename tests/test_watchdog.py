"""The step watchdog (gram_ray/train/watchdog.py): a frozen rank is found, its stacks dumped, the group restarted.
Without Ray: when it counts a rank as frozen, and what holds it (an evaluation, a checkpoint, a wait for data
within storage's grace, here or on another rank). With Ray (make test-cluster): a SIGSTOPped worker and a rank
that never joins a step's collectives, each found, the run restarted from its last checkpoint and ended at its
planned step, with the stacks left in the run folder."""

import json
import signal
import threading
import time

import pytest
from tiny import tiny_config

from gram_ray.train.watchdog import DATA, StepWatchdog, dump_stacks


def _watchdog(now: list, **kwargs) -> StepWatchdog:
    return StepWatchdog(lambda why: None, clock=lambda: now[0], **kwargs)


def test_a_rank_is_frozen_once_no_step_finished_within_the_median_times_n_or_the_floor():
    now = [0.0]
    dog = _watchdog(now, steps=10, floor_s=3.0)
    now[0] = 1000.0
    assert dog.stalled(now[0]) is None  # the group's first step is not timed (compilation, the data pipeline)
    for t in (1.0, 1.5, 2.0, 2.5):  # steps of 0.5 s
        now[0] = t
        dog.step_done()
    assert dog.limit_s() == 5.0  # 10 x 0.5 s, above the floor
    assert dog.stalled(2.5 + 4.9) is None
    why = dog.stalled(2.5 + 5.1)
    assert why.startswith("no step finished for 5 s (the limit: 5 s, the larger of 10 x the median step and 3 s)")
    assert why.endswith("in the step (compute or a collective)")


def test_an_evaluation_or_a_checkpoint_is_not_timed_and_the_clock_restarts_after_it():
    now = [0.0]
    dog = _watchdog(now, steps=10, floor_s=3.0)
    for t in (1.0, 1.5):
        now[0] = t
        dog.step_done()
    with dog.pause():
        now[0] = 100.0
        assert dog.stalled(now[0]) is None
    assert dog.stalled(102.0) is None and dog.stalled(106.0) is not None  # 5 s limit from the pause's end


def test_a_wait_for_data_holds_within_storages_grace_here_or_on_another_rank():
    now = [0.0]
    peers: dict = {}
    dog = _watchdog(now, steps=10, floor_s=3.0, data_grace_s=100.0, peers=lambda: peers)
    for t in (1.0, 1.5):
        now[0] = t
        dog.step_done()
    reads = dog.reads(iter([{"batch": 1}]))
    assert next(reads) == {"batch": 1} and dog.phase != DATA  # a batch that came
    dog.phase, dog.since = DATA, 1.5  # waiting for the next one since 1.5
    assert dog.stalled(50.0) is None  # within 5 s + 100 s of grace
    assert "reading its next batch" in dog.stalled(110.0)
    dog.phase = "step"  # this rank waits in a collective; another reads its batch since 40.0
    peers[1] = (DATA, 40.0, 1.0)  # (phase, since, seconds since it said so)
    assert dog.stalled(60.0) is None and dog.stalled(150.0) is not None


def test_a_peer_that_has_said_nothing_for_the_floor_is_found_even_during_a_checkpoint():
    """A stopped rank cannot run its own watchdog; the others wait for it in a collective, maybe inside a
    checkpoint (not timed): its silence is what finds it."""
    now = [0.0]
    peers = {1: ("step", 0.0, 2.0)}
    dog = _watchdog(now, steps=10, floor_s=60.0, peers=lambda: peers)
    with dog.pause():
        assert dog.stalled(10.0) is None
        peers[1] = ("step", 0.0, 61.0)
        assert dog.stalled(70.0) == "rank 1 has said nothing for 61 s (stopped, or its Python cannot run)"


def test_a_rank_that_found_the_group_frozen_has_every_other_rank_dump_its_stacks_too():
    """The rank that finds the freeze ends its process, and Ray Train then tears the group down: the others, told
    through the beacon, dump theirs first, whatever their own clocks say (waiting in a collective, or in a pause)."""
    now = [0.0]
    peers = {1: ("step", 0.0, 1.0)}
    dog = _watchdog(now, steps=10, floor_s=60.0, peers=lambda: peers)
    with dog.pause():
        assert dog.stalled(61.0) is None
        peers[1] = ("frozen", 60.0, 1.0)
        assert dog.stalled(62.0) == "rank 1 found the group frozen"


def test_a_beacon_that_does_not_answer_leaves_the_ranks_own_steps_to_judge():
    def gone():
        raise TimeoutError("the beacon did not answer")

    now = [0.0]
    dog = _watchdog(now, steps=10, floor_s=3.0, peers=gone)
    for t in (1.0, 1.5):
        now[0] = t
        dog.step_done()
    assert dog.stalled(2.0) is None and dog.stalled(10.0) is not None


def test_the_thread_dumps_once_and_the_stacks_name_every_thread(tmp_path):
    found = []
    fired = threading.Event()

    def on_stall(why: str) -> None:
        dump_stacks(tmp_path / "stacks.txt")
        found.append(why)
        fired.set()

    dog = StepWatchdog(on_stall, steps=10, floor_s=0.3, beat_s=0.05).start()
    dog.step_done()
    dog.step_done()
    assert fired.wait(10)
    time.sleep(0.3)
    dog.stop()
    assert len(found) == 1
    stacks = (tmp_path / "stacks.txt").read_text()
    assert "gram-ray-step-watchdog" in stacks or "Thread 0x" in stacks
    assert "test_the_thread_dumps_once_and_the_stacks_name_every_thread" in stacks  # the main thread, waiting


def _frozen_run(synth_small, tmp_path, *sets):
    from gram_ray.train.trainer import fit

    cfg = tiny_config(
        "train.epochs=6",  # 16 clips / (4 per worker x 2 workers): 2 steps an epoch, 12 in all
        "train.checkpoint_every_steps=1",
        "train.keep_checkpoints=100",
        "train.eval_every_epochs=100",
        "train.log_every_steps=1",
        "scaling.num_workers=2",
        "scaling.max_failures=1",
        f"data.train_annotations={synth_small['train']}",
        f"data.video_dir={synth_small['videos']}",
        f"data.audio_dir={synth_small['audios']}",
        *sets,
    )
    return cfg, fit(cfg, tmp_path / "run", log=lambda *_: None)


def _assert_restarted_with_stacks(summary: dict, tmp_path, ranks_dumped: int) -> dict:
    (recovery,) = summary["recoveries"]
    assert recovery["cause"] == "frozen", recovery
    assert summary["last_metrics"]["step"] == summary["last_metrics"]["total_steps"] == 12
    stacks = sorted((tmp_path / "run" / "stacks").glob("rank-*.txt"))
    assert len(stacks) == ranks_dumped, stacks
    assert all("Thread 0x" in s.read_text() or "Current thread" in s.read_text() for s in stacks)
    return recovery


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.long
def test_a_sigstopped_worker_is_found_within_two_minutes_and_the_run_ends_at_its_planned_step(
    synth_small, ray_session, tmp_path
):
    """One of two workers is SIGSTOPped after the first checkpoint: it makes no progress and cannot say so. The
    other rank waits in a collective (of a step, or of a checkpoint: one every step) until its watchdog finds the
    stopped rank silent for 60 s (the default floor), dumps its own stacks and ends; Ray Train restarts the group
    (the stopped process is killed) from the last checkpoint, and the run ends at its planned step, the next step
    coming within 2 minutes of the freeze. The stopped rank leaves no stacks: it cannot run."""
    from chaos import kill_a_worker_when

    run_root = tmp_path / "run" / "ray" / "gram-demo"
    killer, frozen, finished = kill_a_worker_when(run_root, lambda steps: max(steps) >= 2, sig=signal.SIGSTOP)
    try:
        cfg, (result, summary) = _frozen_run(synth_small, tmp_path, "run.name=gram-demo")
    finally:
        finished.set()
        killer.join(timeout=10)
    assert "pid" in frozen and result.error is None
    recovery = _assert_restarted_with_stacks(summary, tmp_path, ranks_dumped=1)
    (stacks,) = (tmp_path / "run" / "stacks").glob("rank-*.txt")
    found_after_s = stacks.stat().st_mtime - frozen["at"]
    assert found_after_s + recovery["recovery_s"] < 120, (found_after_s, recovery)  # the next step within 2 min
    print(json.dumps({"found_after_s": round(found_after_s, 1), "recovery": recovery}))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.long
def test_a_rank_that_never_joins_a_collective_is_found_and_every_ranks_stacks_are_left(
    synth_small, ray_session, tmp_path, monkeypatch
):
    """GRAM_RAY_TEST_HANG=5:1: after step 5 rank 1 blocks for ever instead of joining the collective every rank
    calls after a step (Ray Train's preemption barrier), where rank 0 waits. Both watchdogs (a 10 s floor here)
    find no step, dump their stacks (rank 0's showing the barrier it waits in, rank 1's the wait) and end; the
    group restarts from the step-5 checkpoint and ends at step 12."""
    monkeypatch.setenv("GRAM_RAY_TEST_HANG", "5:1")
    cfg, (result, summary) = _frozen_run(synth_small, tmp_path, "run.name=hung", "train.watchdog_floor_s=10")
    assert result.error is None
    recovery = _assert_restarted_with_stacks(summary, tmp_path, ranks_dumped=2)
    assert recovery["restarted_from_step"] == 5 and recovery["steps_lost"] == 0
    stacks = {p.name.split("-node-")[0]: p.read_text() for p in (tmp_path / "run" / "stacks").glob("rank-*.txt")}
    assert "in poll" in stacks["rank-1"] and "threading.py" in stacks["rank-1"], stacks["rank-1"]
    assert "get_preemption_info" in stacks["rank-0"], stacks["rank-0"]
    print(json.dumps(recovery))

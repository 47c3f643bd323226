"""A preemption notice costs no step (train/preemption.py), without Ray: the loop trains on while a notice's
deadline leaves time, checkpoints at the last step there is time for, and a run resumed from that checkpoint ends
exactly where an uninterrupted one does. The same notice on a real cluster: tests/test_spot.py."""

import pytest
import torch
from test_model_train import setup  # noqa: F401  (the module's fixture: a tiny config, its data and vocab)
from tiny import in_memory, saved

from gram_ray.train.events import FAILED, NOTE, PREEMPTED, PREEMPTION_CHECKPOINT, RESTARTED, STEP, RunEvents
from gram_ray.train.loop import run_training
from gram_ray.train.preemption import Notice, Notices, Preempted


def _notices(clock: list, **kwargs) -> Notices:
    return Notices(poll=lambda step: None, clock=lambda: clock[0], **kwargs)


def test_a_notice_leaves_time_for_another_step_only_with_room_for_the_checkpoint_and_the_margin():
    now = [1000.0]
    notices = _notices(now, margin_s=5.0)
    for s in (0.5, 0.4, 0.6):
        notices.step_took(s)
    notice = Notice(deadline=1020.0, ranks=(1,), nodes=("n1",))
    assert not notices.may_train_on(notice)  # no checkpoint measured yet: no telling how long one takes
    notices.checkpoint_took(2.0)
    # another step needs 2 x 0.6 (the last step, longer than the median) + 1.5 x 2.0 + 5.0 = 9.2 s
    assert notices.may_train_on(notice)  # 20 s left
    now[0] = 1010.5  # 9.5 s left
    assert notices.may_train_on(notice)
    now[0] = 1011.0  # 9.0 s left
    assert not notices.may_train_on(notice)
    assert not notices.may_train_on(Notice(deadline=None, ranks=(0,), nodes=("n0",)))  # no deadline: at once


def _train(cfg, train, vocab, notices=None, resume=None):
    """run_training over in-memory rows; returns (checkpoints reported, steps logged, the step it stopped at for
    a preemption or None)."""
    checkpoints, steps = [], []

    def report(metrics, ckpt):
        if ckpt is not None:
            checkpoints.append(saved(ckpt))

    try:
        run_training(
            cfg,
            **in_memory(cfg, train, vocab),
            report=report,
            resume=resume,
            log=lambda m: steps.append(m["step"]),
            notices=notices,
        )
    except Preempted as e:
        return checkpoints, steps, e.step
    return checkpoints, steps, None


@pytest.mark.parametrize("checkpoint_before_the_notice", [True, False])
def test_a_notice_is_met_by_a_checkpoint_at_the_last_step_there_is_time_for_and_costs_no_step(
    setup,  # noqa: F811
    checkpoint_before_the_notice,
):
    """A notice arrives after step 5 of 12 with 9 s left (the clock moves 1 s a step). With a checkpoint's time
    known (one every 2 steps), the loop trains on while another step leaves the margin, then checkpoints at the
    step it stopped at and waits; with none written yet it checkpoints at once. Resumed from that checkpoint, the
    run ends at step 12 with the weights of a run never interrupted: no step trained twice, none skipped."""
    cfg, train, _, vocab = setup
    cfg = cfg.model_copy(deep=True)
    # 16 clips / batch 4 = 4 steps an epoch, 3 epochs; the epoch's evaluation at each end (no val split)
    cfg.train.epochs, cfg.train.warmup_steps, cfg.train.schedule = 3, None, "linear"
    if checkpoint_before_the_notice:
        cfg.train.checkpoint_every_steps = 2
    else:
        cfg.train.checkpoint_every_steps, cfg.train.eval_every_epochs = None, 100  # the first one: at the run's end
    _, full_steps, _ = _train(cfg, train, vocab)
    full = _train(cfg, train, vocab)[0][-1]

    now, polls, said = [0.0], [0], []

    def poll(step):
        polls[0] += 1
        now[0] += 1.0
        return Notice(deadline=14.0, ranks=(1,), nodes=("node-b",)) if now[0] >= 5.0 else None

    notices = Notices(poll, announce=lambda event, text, fields: said.append((event, text, fields)),
                      clock=lambda: now[0])  # fmt: skip
    checkpoints, steps, stopped = _train(cfg, train, vocab, notices)
    assert stopped is not None and steps[-1] == stopped == checkpoints[-1]["step"]  # nothing trained after it
    assert not checkpoints[-1]["epoch_complete"]  # mid-epoch: the rest of the epoch's clips come after it
    noticed_at = said[0][2]["step"]
    if checkpoint_before_the_notice:
        assert stopped > noticed_at  # it trained on during the notice
    else:
        assert stopped == noticed_at  # no checkpoint time known: at once
    assert [e for e, _, _ in said] == [PREEMPTED, PREEMPTION_CHECKPOINT]
    assert said[0][2]["deadline_in_s"] == 14.0 - 5.0 and "preemption notice at step" in said[0][1]
    assert said[1][2]["step"] == stopped and "registered" in said[1][1] and "waiting for the restart" in said[1][1]

    rest, rest_steps, again = _train(cfg, train, vocab, resume=checkpoints[-1])
    assert again is None and steps + rest_steps == full_steps == list(range(1, 13))
    for name, expected in full["model"].items():
        torch.testing.assert_close(rest[-1]["model"][name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_a_preemption_is_recorded_with_its_notice_checkpoint_and_the_time_from_the_nodes_loss():
    from gram_ray.train.console import Console

    times = iter([0.0, 1.0, 2.0, 9.0, 10.0, 20.0, 30.0, 31.0, 40.0])
    events, lines = RunEvents(clock=lambda: next(times)), []
    console = Console(lines.append, bar=False)
    for record in (
        {"kind": STEP, "step": 5, "workers": 2},
        {"kind": NOTE, "event": PREEMPTED, "step": 5, "deadline_in_s": 30.0, "ranks": [1], "text": "notice"},
        {"kind": STEP, "step": 6, "workers": 2},
        {"kind": STEP, "step": 9, "workers": 2},
        {"kind": NOTE, "event": PREEMPTION_CHECKPOINT, "step": 10, "checkpoint_s": 1.2, "text": "checkpoint"},
        {"kind": NOTE, "event": FAILED, "text": "worker group failed: rank 1 (node gone)"},  # at 20 s
        {"kind": NOTE, "event": FAILED, "text": "worker group failed: rank 1 (node gone)"},
        {"kind": NOTE, "event": RESTARTED, "step": 10, "text": "restarted"},
        {"kind": STEP, "step": 11, "workers": 2},  # at 40 s
    ):
        lines += [console.event_line(e) for e in events.record(record)]
    (recovery,) = events.recoveries
    assert recovery["cause"] == "preemption" and recovery["steps_lost"] == 0
    assert recovery["failed_after_step"] == recovery["restarted_from_step"] == 10
    assert recovery["recovery_s"] == 20.0  # from the node's loss (at 20 s, before its deadline at 31 s)
    assert recovery["notice"] == {"deadline_in_s": 30.0, "ranks": [1]}
    assert recovery["checkpoint"] == {"step": 10, "checkpoint_s": 1.2}
    assert (
        "recovered from the preemption: 0 steps lost (trained up to step 10, restarted from the checkpoint of step "
        "10), 20.0 s from the node's loss to the first step after it"
    ) in lines


def test_a_preemption_without_a_reported_loss_is_timed_from_its_deadline():
    """Ray Train restarts the group at the deadline; the node may go only after it (or never report a failure)."""
    times = iter([0.0, 1.0, 25.0, 40.0])
    events = RunEvents(clock=lambda: next(times))
    for record in (
        {"kind": STEP, "step": 5, "workers": 2},
        {"kind": NOTE, "event": PREEMPTED, "step": 5, "deadline_in_s": 20.0, "ranks": [1], "text": "notice"},
        {"kind": NOTE, "event": RESTARTED, "step": 5, "text": "restarted"},
        {"kind": STEP, "step": 6, "workers": 2},  # at 40 s: 19 s after the deadline (1 s + 20 s)
    ):
        events.record(record)
    (recovery,) = events.recoveries
    assert recovery["recovery_s"] == 19.0 and recovery["steps_lost"] == 0


def test_a_restart_no_failure_was_reported_for_is_still_recorded_with_the_steps_it_lost():
    """Ray Train restarts the group at a drain's deadline whether or not a worker has failed yet; without the
    preemption checkpoint (train.preemption_checkpoint: false) nothing else says so."""
    from gram_ray.train.console import Console

    times = iter([0.0, 1.0, 2.0, 10.0])
    events, lines = RunEvents(clock=lambda: next(times)), []
    for record in (
        {"kind": STEP, "step": 40, "workers": 2},
        {"kind": STEP, "step": 49, "workers": 2},
        {"kind": NOTE, "event": RESTARTED, "step": 25, "text": "restarted"},
        {"kind": STEP, "step": 26, "workers": 2},
    ):
        lines += [Console(bar=False).event_line(e) for e in events.record(record)]
    (recovery,) = events.recoveries
    assert (recovery["cause"], recovery["steps_lost"], recovery["recovery_s"]) == ("restart", 24, 8.0)
    assert lines == [
        "restarted: 24 steps lost (trained up to step 49, restarted from the checkpoint of step 25), 8.0 s from the "
        "restart to the first step after it"
    ]

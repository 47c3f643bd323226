"""A drain notice costs no step: when the node of any rank is to go (a spot reclaim, a preemptible VM, a pod's
SIGTERM, each turned into a Ray drain with a deadline), the loop trains on while there is time, writes a
checkpoint that is whole and registered before the deadline, then waits for Ray Train to restart the group on the
nodes left. The restarted group resumes at exactly that step: nothing trained is trained again.

Free of Ray, like the loop: `Notices` is given a `poll(step)` (in a Ray Train worker:
ray.train.get_preemption_info, a barrier every rank calls after every step) and a `wait` (in a worker: block
until the group is torn down; returning would end the run as finished). Every rank follows rank 0's decisions,
so all of them reach the checkpoint's collectives at the same step.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gram_ray.distributed import gather_objects
from gram_ray.train.events import PREEMPTED, PREEMPTION_CHECKPOINT

__all__ = ["Notice", "Notices", "Preempted", "notice_text"]

# Beyond the checkpoint's own time: Ray Train registers a reported checkpoint at its next poll of the workers
# (every 2 s), and a node's clock, its removal and the notice's own rounding are each off by a second or so.
MARGIN_S = 5.0


@dataclass(frozen=True)
class Notice:
    """Nodes of the group that are being drained: `deadline` (Unix time) is when the first of them goes, None
    when the drain named no deadline (checkpoint at once)."""

    deadline: float | None
    ranks: tuple[int, ...]
    nodes: tuple[str, ...]


class Preempted(Exception):
    """Outside Ray Train (tests, notebooks): the loop stopped at its preemption checkpoint, at `step`."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted after the checkpoint of step {step}")
        self.step = step


def _raise_preempted(notice: Notice, step: int) -> None:
    raise Preempted(step)


class Notices:
    """After each step: is a notice out, and is there time for another step before the checkpoint that must be
    whole before its deadline? The times it judges by are this rank's: the last steps' wall time and its last
    checkpoint's, from taking it to stored (report and upload included, in the background or not); rank 0's
    judgement is every rank's."""

    def __init__(
        self,
        poll: Callable[[int], Notice | None],
        wait: Callable[[Notice, int], None] = _raise_preempted,
        announce: Callable[[str, str, dict], None] = lambda event, text, fields: None,
        confirm: Callable[[int, float], bool] = lambda step, timeout_s: True,
        clock: Callable[[], float] = time.time,
        margin_s: float = MARGIN_S,
    ) -> None:
        """announce(event, text, fields): what happened (events.PREEMPTED, PREEMPTION_CHECKPOINT), for the
        console, result.json and W&B (rank 0 only).
        confirm(step, timeout_s): blocks until the checkpoint of `step` is registered; False when it is not in
        time. wait(notice, step): does not return (raises Preempted by default)."""
        self.poll, self.wait, self.announce, self.confirm = poll, wait, announce, confirm
        self.clock, self.margin_s = clock, margin_s
        self.steps_s: deque[float] = deque(maxlen=20)
        self.checkpoint_s: float | None = None  # the last checkpoint's time on this rank; None: none yet
        self.notice: Notice | None = None

    def step_took(self, seconds: float) -> None:
        self.steps_s.append(seconds)

    def checkpoint_took(self, seconds: float) -> None:
        self.checkpoint_s = seconds

    def step_s(self) -> float:
        """A step's time, erring long: the larger of the recent median and the last."""
        return max(statistics.median(self.steps_s), self.steps_s[-1]) if self.steps_s else 0.0

    def may_train_on(self, notice: Notice) -> bool:
        """Another step still leaves time for the checkpoint (at 1.5 times its last time) and the margin. Without
        a deadline or a measured checkpoint there is no telling: checkpoint now."""
        if notice.deadline is None or self.checkpoint_s is None:
            return False
        left = notice.deadline - self.clock()
        return left > 2 * self.step_s() + 1.5 * self.checkpoint_s + self.margin_s

    def heed(self, step: int, checkpoint: Callable[[], None], rank0: bool) -> None:
        """Called by every rank after every step (the poll is a collective). Returns while training may go on;
        otherwise checkpoints (unless `step` already has one: checkpoint() is then a no-op the caller gives),
        then waits for the restart."""
        notice = self.poll(step)
        if notice is None:
            return
        if self.notice is None:  # the first sight of it
            self.notice = notice
            if rank0:
                now = self.clock()
                self.announce(PREEMPTED, notice_text(notice, now, step), _notice_fields(notice, now, step))
        if gather_objects(self.may_train_on(notice))[0]:  # rank 0 decides: every rank checkpoints at one step
            return
        started = self.clock()
        checkpoint()
        if rank0:  # the checkpoint may still be uploading in the background: it counts once registered
            left = None if notice.deadline is None else notice.deadline - self.clock()
            registered = self.confirm(step, max(1.0, left or 60.0))
            took = self.clock() - started
            left = None if notice.deadline is None else notice.deadline - self.clock()
            outcome = "stored and registered" if registered else "NOT confirmed as registered"
            text = f"checkpoint at step {step} for the preemption, {outcome} in {took:.2f} s"
            text += f", {left:.1f} s before the deadline" if left is not None else ""
            fields = {"step": step, "checkpoint_s": round(took, 2), "registered": registered}
            self.announce(PREEMPTION_CHECKPOINT, text + "; waiting for the restart", fields)
        self.wait(notice, step)


def _notice_fields(notice: Notice, now: float, step: int) -> dict:
    fields = {"step": step, "ranks": list(notice.ranks), "nodes": list(notice.nodes)}
    if notice.deadline is not None:
        fields["deadline_in_s"] = round(notice.deadline - now, 1)
    return fields


def notice_text(notice: Notice, now: float, step: int) -> str:
    ranks = ", ".join(str(r) for r in notice.ranks)
    nodes = ", ".join(n[:8] for n in notice.nodes)
    when = (
        f"goes at {time.strftime('%H:%M:%S', time.gmtime(notice.deadline))} UTC, in {notice.deadline - now:.1f} s"
        if notice.deadline is not None
        else "goes with no deadline given"
    )
    s = "s" if len(notice.ranks) > 1 else ""
    return (
        f"preemption notice at step {step}: the node of rank{s} {ranks} ({nodes}) {when}; training on while "
        "there is time, then a checkpoint before it goes"
    )

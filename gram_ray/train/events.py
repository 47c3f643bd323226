"""What happened to a run's worker group, told by its progress records: each recovery (a failure or an elastic
resize, the steps it lost and the time it took) and the group's size over the run.

`fit` owns a RunEvents and writes what it recorded into result.json, whether or not a console is attached; a
Console (console.py) only formats the events each record completes into lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = [
    "EVAL",
    "FAILED",
    "FROZEN",
    "NOTE",
    "PREEMPTED",
    "PREEMPTION_CHECKPOINT",
    "RESIZING",
    "RESTARTED",
    "STEP",
    "RunEvents",
]

STEP, EVAL, NOTE = "step", "eval", "note"  # a note: one line of text (e.g. a restart and what it cost)
# Notes that mark a recovery (a field "event" of a NOTE record): the worker group failed (a worker or its node
# died), or an elastic group is being resized (nodes came or went), then it restarted from a checkpoint ("step":
# the checkpoint's step).
FAILED, RESIZING, RESTARTED = "failed", "resizing", "restarted"
# A node of the group is being drained with a deadline (a preemption notice: "deadline_in_s"), then the loop's
# checkpoint for it ("step", "checkpoint_s"); the group restarts once the node has gone.
PREEMPTED, PREEMPTION_CHECKPOINT = "preempted", "preemption_checkpoint"
# A rank's step watchdog found it frozen (train/watchdog.py): it dumped its stacks and ends; the group restarts.
FROZEN = "frozen"


class RunEvents:
    """Follows failures, preemptions, resizes and restarts, per source (a run, or a sweep's trial). Steps lost: the
    newest step seen before the restart minus the step of the checkpoint the group restarted from (those are
    trained again). Time: from the failure's (or resize's) report to the first step after the restart; for a
    preemption, from the node's loss: its deadline, or the failure its loss caused if that came first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.recoveries: list[dict] = []  # one per worker-group restart: what it cost
        # per source: the worker group's size over the run, [{"from_step", "workers", "at_s"}] (step records
        # carry the size; at_s counts from the source's first record)
        self.world_sizes: dict[str, list[dict]] = {}
        self._start: dict[str, float] = {}
        self._last_step: dict[str, int] = {}  # per source: the newest step seen
        self._pending: dict[str, dict] = {}  # per source: a failure or resize whose recovery is not finished yet

    def record(self, record: dict) -> list[dict]:
        """Take one progress record; returns the events it completes: {"event": "recovered", **the recovery} when
        the first step after a restart arrives, {"event": "world_size", "before", "workers", "from_step"} when the
        group's size changed."""
        source, now = record.get("source", ""), self.clock()
        start = self._start.setdefault(source, now)
        event = record.get("event") if record["kind"] == NOTE else None
        pending = self._pending.get(source)
        last = self._last_step.get(source, 0)
        if event == FROZEN and pending is None:
            pending = self._begin(source, "frozen", now, last)
        elif event in (FAILED, RESIZING, PREEMPTED):
            if pending is not None and pending["cause"] == "preemption" and event == FAILED:
                # the noticed node has gone (before its deadline, or after it): the recovery starts at the earlier
                pending["node_lost_at"] = min(now, pending.get("node_lost_at", now))
            elif pending is None:
                cause = {FAILED: "failure", RESIZING: "resize", PREEMPTED: "preemption"}[event]
                pending = self._begin(source, cause, now, max(last, record.get("step", 0)))
                if event == PREEMPTED:
                    pending["notice"] = {k: record[k] for k in ("deadline_in_s", "ranks") if k in record}
                    if "deadline_in_s" in record:  # Ray Train restarts the group at the deadline, node gone or not
                        pending["node_lost_at"] = now + record["deadline_in_s"]
        elif event == PREEMPTION_CHECKPOINT and pending is not None:
            pending["checkpoint"] = {k: record[k] for k in ("step", "checkpoint_s", "registered") if k in record}
            pending["step"] = max(pending["step"], record.get("step", 0))  # step lines may come every few steps
        elif event == RESTARTED:
            if pending is None:  # no failure was reported (Ray Train restarted at a drain's deadline, say)
                pending = self._begin(source, "restart", now, last)
            pending["restart_step"] = record["step"]
        elif record["kind"] == STEP:
            self._last_step[source] = record["step"]
            if pending is not None and "restart_step" not in pending:  # the group trains on, e.g. after a notice
                pending["step"] = max(pending["step"], record["step"])
            return self._recovered(source, record, now) + self._resized(source, record, now - start)
        return []

    def _begin(self, source: str, cause: str, now: float, step: int) -> dict:
        """A recovery under way: what caused it, when it was reported, the newest step trained before it."""
        pending = self._pending[source] = {"at": now, "step": step, "cause": cause}
        return pending

    def _recovered(self, source: str, record: dict, now: float) -> list[dict]:
        pending = self._pending.get(source)
        if pending is None or "restart_step" not in pending:
            return []
        del self._pending[source]
        recovery = {
            "cause": pending["cause"],
            "failed_after_step": pending["step"],
            "restarted_from_step": pending["restart_step"],
            "steps_lost": max(0, pending["step"] - pending["restart_step"]),
            "recovery_s": round(now - pending.get("node_lost_at", pending["at"]), 1),
            "first_step_after": record["step"],
            "workers": record.get("workers"),
        }
        recovery |= {k: pending[k] for k in ("notice", "checkpoint") if k in pending}
        self.recoveries.append(recovery)
        return [{"event": "recovered"} | recovery]

    def _resized(self, source: str, record: dict, at_s: float) -> list[dict]:
        sizes = self.world_sizes.setdefault(source, [])
        workers = record.get("workers")
        if workers is None or (sizes and sizes[-1]["workers"] == workers):
            return []
        sizes.append({"from_step": record["step"], "workers": workers, "at_s": round(at_s, 1)})
        if len(sizes) == 1:
            return []
        return [
            {"event": "world_size", "before": sizes[-2]["workers"], "workers": workers, "from_step": record["step"]}
        ]

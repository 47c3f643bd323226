"""A frozen worker is found: a read from storage that never returns, a wedged GPU, a collective one rank never
joins. The process is alive, so Ray sees nothing wrong (Ray Train declares a worker dead only when its poll hangs
for 10 minutes), and the other ranks sit in their collective without a word.

A thread on every rank watches two things, and on either dumps this process's Python stacks (every thread) and
ends the process, so that Ray Train restarts the group from the last whole checkpoint; every live rank does the
same, so the stacks of all of them are left (a SIGSTOPped process can dump nothing):

- its own steps: none finished within max(`steps` x the median step time, `floor_s`) while the loop is in a step
  (an evaluation or a checkpoint is not timed; nor is a group's first step, which compiles and fills the data
  pipeline). Waiting for data is not frozen while storage's own retries may still ride an outage out: a rank
  reading its next batch holds for `data_grace_s` more, and so do the ranks stuck in the step's collectives
  behind it, which learn of it from `peers()`;
- its peers: each rank's thread says its phase every `beat_s` (in a worker, to a small Ray actor), and a rank that
  has said nothing for `floor_s` is frozen whatever this rank is doing: a stopped process, or one whose Python
  cannot run, leaves the others waiting in a collective, inside a checkpoint as much as in a step.

Free of Ray.
"""

from __future__ import annotations

import faulthandler
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["DATA", "STEP", "StepWatchdog", "dump_stacks"]

STEP, DATA = "step", "data"  # where a rank is: in a step's compute and collectives, or reading its next batch
FROZEN = "frozen"  # a rank that found the group frozen says so, and every other rank dumps its stacks too


def dump_stacks(path) -> None:
    """Every thread's Python stack of this process, written to `path` (faulthandler: no lock is taken, so it works
    while the main thread is wedged in C code)."""
    with open(path, "w") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)


class StepWatchdog:
    def __init__(
        self,
        on_stall: Callable[[str], None],
        steps: int = 10,
        floor_s: float = 60.0,
        data_grace_s: float = 0.0,
        publish: Callable[[str, float], None] = lambda phase, since: None,
        peers: Callable[[], dict[int, tuple[str, float, float]]] = dict,
        beat_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """on_stall(why): dump and end (called once, from the watchdog's thread). publish(phase, since) and peers():
        this rank's phase for the others, and theirs ({rank: (phase, since, seconds since it last said)}: the other
        ranks of this group)."""
        self.on_stall, self.steps, self.floor_s, self.data_grace_s = on_stall, steps, floor_s, data_grace_s
        self.publish, self.peers, self.beat_s, self.clock = publish, peers, beat_s, clock
        self.steps_s: deque[float] = deque(maxlen=50)
        self.phase, self.since = STEP, clock()  # since: when this rank last made progress (or entered its phase)
        self.last_step_at: float | None = None  # None until the group's first step: not timed
        self.moved_at = self.since  # a step done, a pause begun or ended: nothing can be frozen for floor_s after
        self.paused = 0
        self.fired = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StepWatchdog:
        self._thread = threading.Thread(target=self._watch, name="gram-ray-step-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def step_done(self) -> None:
        now = self.clock()
        if self.last_step_at is not None:
            self.steps_s.append(now - self.last_step_at)
        self.last_step_at, self.phase, self.since = now, STEP, now
        self.moved_at = now

    @contextmanager
    def pause(self) -> Iterator[None]:
        """An evaluation, a checkpoint, a wait for a restart: not a step, not timed; the clock restarts after."""
        self.paused += 1
        self.moved_at = self.clock()
        try:
            yield
        finally:
            self.paused -= 1
            self.moved_at = self.clock()
            if self.last_step_at is not None:
                self.last_step_at = self.since = self.moved_at

    def reads(self, batches: Iterator) -> Iterator:
        """`batches` with every wait for the next one marked as reading data."""
        while True:
            self.phase, self.since = DATA, self.clock()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.phase = STEP
            yield batch

    def limit_s(self) -> float:
        median = statistics.median(self.steps_s) if self.steps_s else 0.0
        return max(self.steps * median, self.floor_s)

    def stalled(self, now: float) -> str | None:
        """Why the group counts as frozen at `now`, or None."""
        if self.fired or now - self.moved_at < self.floor_s:
            return None  # neither rule can hold yet (every limit is floor_s or more): the peers are not asked
        try:
            peers = self.peers()
        except Exception:  # the peers' view is a help: without it, this rank's own steps still count
            peers = {}
        found = sorted(rank for rank, (phase, _, _) in peers.items() if phase == FROZEN)
        if found:
            return f"rank {found[0]} found the group frozen"
        silent = {rank: quiet for rank, (_, _, quiet) in peers.items() if quiet >= self.floor_s}
        if silent:
            rank, quiet = max(silent.items(), key=lambda item: item[1])
            return f"rank {rank} has said nothing for {quiet:.0f} s (stopped, or its Python cannot run)"
        if self.paused or self.last_step_at is None:
            return None
        waited, limit = now - self.last_step_at, self.limit_s()
        if waited < limit:
            return None
        if self.phase == DATA and now - self.since < limit + self.data_grace_s:
            return None  # storage's retries may still bring the batch
        fresh = 3 * self.beat_s
        holding = [
            since
            for phase, since, quiet in peers.values()
            if phase == DATA and quiet < fresh and now - since < limit + self.data_grace_s
        ]
        if holding:
            return None  # another rank waits for its data, within storage's grace: the collective waits on it
        where = "reading its next batch" if self.phase == DATA else "in the step (compute or a collective)"
        return (
            f"no step finished for {waited:.0f} s (the limit: {limit:.0f} s, the larger of {self.steps} x the median "
            f"step and {self.floor_s:g} s), {where}"
        )

    def _watch(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self.publish(self.phase, self.since)
            except Exception:  # the peers' view is a help, not a condition
                pass
            why = self.stalled(self.clock())
            if why is not None:
                self.fired = True
                try:  # the other ranks dump theirs at their next beat, before the group is torn down
                    self.publish(FROZEN, self.clock())
                except Exception:
                    pass
                self.on_stall(why)
                return

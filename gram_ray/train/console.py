"""What a person sees while a run trains: one compact line per log interval and per evaluation, printed by the
driver, and a progress bar when the console is a terminal.

Records reach the driver through a Ray queue: rank 0 puts a step record every train.log_every_steps, and Ray
Train's controller (ProgressCallback.after_report) puts one for every report with an evaluation. A printer thread
on the driver shows what arrives while the blocking fit runs, so nothing depends on Ray forwarding worker output
(which the default console keeps off: Ray's own INFO lines stay in its session logs).
"""

from __future__ import annotations

import queue as queue_lib
import sys
import threading
import time
from collections.abc import Callable

from gram_ray.train.events import EVAL, FAILED, NOTE, RESIZING, RESTARTED, STEP, RunEvents

__all__ = [
    "Console",
    "ProgressQueue",
    "step_record",
    "put_record",
    "progress_callback",
    "resize_callback",
    "run_with_progress",
]


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Console:
    """Formats progress records as lines; on a terminal also keeps a one-line bar at the bottom."""

    def __init__(
        self,
        echo: Callable[[str], None] = print,
        bar: bool | None = None,
        main_metric: str = "",
    ) -> None:
        self.echo = echo
        self.bar = sys.stdout.isatty() if bar is None else bar
        self.main_metric = main_metric
        self.lines = 0
        self._bar_shown = False
        self._origin: dict[str, tuple[float, int]] = {}  # per source: (time, step) of its first step record

    def event_line(self, event: dict) -> str:
        """A line for an event a RunEvents returned."""
        if event["event"] == "world_size":
            return f"world size: {event['before']} -> {event['workers']} workers from step {event['from_step']}"
        what = {
            "failure": "recovered",
            "preemption": "recovered from the preemption",
            "frozen": "recovered from the frozen step",
            "restart": "restarted",
        }.get(event["cause"], "resized")
        since = {"preemption": "the node's loss", "frozen": "the watchdog's finding", "restart": "the restart"}.get(
            event["cause"], f"the {event['cause']}"
        )
        return (
            f"{what}: {event['steps_lost']} steps lost (trained up to step {event['failed_after_step']}, restarted "
            f"from the checkpoint of step {event['restarted_from_step']}), {event['recovery_s']:.1f} s from "
            f"{since} to the first step after it"
        )

    def _eta(self, source: str, step: int, total: int) -> str:
        now = time.perf_counter()
        t0, s0 = self._origin.setdefault(source, (now, step))
        return _duration((now - t0) / (step - s0) * (total - step)) if step > s0 else "..."

    def step_line(self, r: dict, prefix: str = "") -> str:
        step, total = r["step"], r.get("total_steps") or r["step"]
        return (
            f"{prefix}epoch {r['epoch'] + 1}/{r['epochs']:g}  step {step}/{total}  loss {r['train/loss']:.4f}  "
            f"lr {r['train/lr']:.2e}  {r['train/samples_per_s']:.0f} samples/s  "
            f"ETA {self._eta(r.get('source', ''), step, total)}"
            + (f"  {r['train/skipped_steps']} steps skipped (non-finite)" if r.get("train/skipped_steps") else "")
        )

    def eval_line(self, r: dict, prefix: str = "") -> str:
        value = r.get(self.main_metric)
        metric = self.main_metric.removeprefix("val/")
        shown = f"val {metric} {value:.1f}" if value is not None else "no val split"
        saved = "  checkpoint saved" if r.get("checkpoint") else ""
        where = f"epoch {r['epoch'] + 1}/{r['epochs']:g}  step {r['step']}/{r.get('total_steps', '?')}"
        return f"{prefix}eval  {where}  {shown}{saved}"

    def show(self, record: dict, events: list[dict] = ()) -> None:
        """Print a record's line, after the lines of the events it completed (RunEvents.record)."""
        prefix = f"[{record['source']}] " if record.get("source") else ""
        tracked = [self.event_line(e) for e in events]
        if record["kind"] == NOTE and record.get("event") == RESTARTED:
            self._origin.pop(record.get("source", ""), None)  # the ETA starts again from the restart
        if record["kind"] == NOTE:
            line = prefix + record["text"]
        else:
            line = self.step_line(record, prefix) if record["kind"] == STEP else self.eval_line(record, prefix)
        if self.bar and self._bar_shown:
            sys.stdout.write("\r\033[K")
        for text in tracked:
            self.echo(prefix + text)
            self.lines += 1
        self.echo(line)
        self.lines += 1
        if self.bar and record.get("total_steps") and record["kind"] != NOTE:
            done = record["step"] / record["total_steps"]
            width = 30
            sys.stdout.write(f"[{'#' * int(done * width):<{width}}] {100 * done:5.1f}%")
            sys.stdout.flush()
            self._bar_shown = True

    def close(self) -> None:
        if self.bar and self._bar_shown:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()
            self._bar_shown = False


def ProgressQueue():  # a factory that reads like the class it makes
    """A Ray queue (a zero-CPU actor) that workers and the train controller put progress records into. It lives
    on the driver's node, whose life is the run's: on a worker node it would die with that node (a spot node)."""
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": on_this_node()})


def on_this_node():
    """A scheduling strategy for a run's small actors (its progress queue, its ranks' beacon): this process's node,
    the driver's, whose life is the run's."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def step_record(metrics: dict, epochs: float) -> dict:
    keys = ("step", "total_steps", "epoch", "train/loss", "train/lr", "train/samples_per_s", "train/skipped_steps")
    return {"kind": STEP, "epochs": epochs, **{k: metrics[k] for k in keys if k in metrics}}


def progress_callback(progress, main_metric: str, epochs: float, source: str = ""):
    """A Ray Train UserCallback that puts one record per report with an evaluation (runs on the controller)."""
    from ray.train import UserCallback

    class ProgressCallback(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = metrics[0] if metrics else {}
            if main_metric not in first:
                return  # a mid-epoch checkpoint: the step lines already say where training is
            # Without a val split the loop reports the main metric as 0.0 (for checkpoint scoring): not shown.
            shown = (
                ("step", "total_steps", "epoch", main_metric)
                if "val_eval" in first
                else ("step", "total_steps", "epoch")
            )
            record = {k: first[k] for k in shown if k in first}
            record |= {"kind": EVAL, "epochs": epochs, "source": source, "checkpoint": checkpoint is not None}
            put_record(progress, record)

        def after_exception(self, run_context, worker_exceptions):
            # A worker raised, or its process or node died (Ray Train's health check): the group is restarted
            # from the last checkpoint if scaling.max_failures allows, else the run fails.
            errors = sorted(worker_exceptions.items())
            text = "worker group failed: " + ", ".join(f"rank {r} ({str(e).splitlines()[0][:160]})" for r, e in errors)
            put_record(progress, {"kind": NOTE, "event": FAILED, "text": text, "source": source})

    return ProgressCallback()


def resize_callback(progress, source: str = ""):
    """A Ray Train controller callback that puts a note when an elastic worker group is resized while it runs
    (nodes came back, or the cluster shrank without a worker failing). Ray Train's public UserCallback has no hook
    for it; this uses the controller's own callback interface (RunConfig.callbacks takes it as is)."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class ResizeCallback(ControllerCallback):
        def __init__(self) -> None:
            self.workers = None  # the size of the group started last

        def before_controller_execute_resize_decision(self, resize_decision):
            self.workers = resize_decision.num_workers

        def after_controller_state_update(self, previous_state, current_state):
            if type(current_state).__name__ != "ResizingState":  # a running group about to be resized
                return
            new = current_state.scaling_decision.num_workers
            text = f"resizing the worker group: {self.workers} -> {new} workers (the cluster's resources changed)"
            put_record(progress, {"kind": NOTE, "event": RESIZING, "text": text, "source": source})

    return ResizeCallback()


def put_record(progress, record: dict) -> None:
    """Put a record without waiting; a progress display must never fail a training run."""
    try:
        progress.put_nowait(record)
    except Exception:
        pass


def run_with_progress(
    fit: Callable[[], object],
    progress,
    events: RunEvents,
    console: Console | None = None,
    poll_s: float = 0.5,
):
    """Run fit() (in this thread: Tune and Ctrl+C need the main thread's signal handlers) while a thread takes the
    records that arrive: events records each, and a console, if any, shows it. Returns fit()'s value, or raises
    its error."""
    done = threading.Event()

    def take(record: dict) -> None:
        happened = events.record(record)
        if console is not None:
            console.show(record, happened)

    def printer() -> None:
        while True:
            try:
                take(progress.get(timeout=poll_s))
            except (queue_lib.Empty, Exception):  # ray.util.queue.Empty, or the queue is gone
                if done.is_set():
                    return

    thread = threading.Thread(target=printer, name="gram-ray-progress", daemon=True)
    thread.start()
    try:
        return fit()
    finally:
        done.set()  # the printer drains what is left, then stops
        thread.join(timeout=10 * poll_s + 5)
        if console is not None:
            console.close()

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

__all__ = ["Console", "ProgressQueue", "NOTE", "step_record", "progress_callback", "run_with_progress"]

STEP, EVAL, NOTE = "step", "eval", "note"  # a note: one line of text (e.g. a restart and what it cost)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Console:
    """Formats progress records as lines; on a terminal also keeps a one-line bar at the bottom."""

    def __init__(self, echo: Callable[[str], None] = print, bar: bool | None = None, main_metric: str = "") -> None:
        self.echo = echo
        self.bar = sys.stdout.isatty() if bar is None else bar
        self.main_metric = main_metric
        self.lines = 0
        self._bar_shown = False
        self._origin: dict[str, tuple[float, int]] = {}  # per source: (time, step) of its first step record

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

    def show(self, record: dict) -> None:
        prefix = f"[{record['source']}] " if record.get("source") else ""
        if record["kind"] == NOTE:
            line = prefix + record["text"]
        else:
            line = self.step_line(record, prefix) if record["kind"] == STEP else self.eval_line(record, prefix)
        if self.bar and self._bar_shown:
            sys.stdout.write("\r\033[K")
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
    """A Ray queue (a zero-CPU actor) that workers and the train controller put progress records into."""
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


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
            record = {k: first[k] for k in ("step", "total_steps", "epoch", main_metric) if k in first}
            record |= {"kind": EVAL, "epochs": epochs, "source": source, "checkpoint": checkpoint is not None}
            try:
                progress.put_nowait(record)
            except Exception:  # progress display must never fail a training run
                pass

    return ProgressCallback()


def run_with_progress(fit: Callable[[], object], progress, console: Console, poll_s: float = 0.5):
    """Run fit() (in this thread: Tune and Ctrl+C need the main thread's signal handlers) while a printer thread
    shows the records that arrive; returns fit()'s value, or raises its error."""
    done = threading.Event()

    def printer() -> None:
        while True:
            try:
                console.show(progress.get(timeout=poll_s))
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
        console.close()

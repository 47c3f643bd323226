"""Ray's own lines that are known to be harmless, kept off the console and written to a log file instead.

Ray's lines reach a driver's console three ways: Python logging under the `ray` logger, ERROR-level lines its C++
core worker writes straight to the process's stderr (file descriptor 2), and what the driver's error listener
thread prints of the raylet's messages (worker-pool warnings) to stdout. `quiet_ray()` filters all three, for the
lines in HARMLESS only: each is written to a log file and dropped from the console; every other line passes
through as it came, so a real problem still shows. `--verbose` leaves the console as Ray makes it.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
from pathlib import Path

__all__ = ["HARMLESS", "is_harmless", "quiet_ray"]

# (pattern, why it is harmless in gram-ray's runs)
HARMLESS = (
    (
        re.compile(r"Token authentication is enabled for this Ray cluster"),
        "Ray says at start that token authentication is on: gram-ray keeps it on, on purpose (every node and "
        "submitter shares the session's token); nothing is wrong.",
    ),
    (
        re.compile(r"has constructor arguments in the object store and max_restarts > 0"),
        "Ray Data's actor pools (batch inference in evaluate and the demo, the index's actors) are created with "
        "restarts allowed and their map function in the object store; the driver holds it for the dataset's "
        "whole life, so a restarted actor finds it. The warning is about arguments lost before a restart.",
    ),
    (
        re.compile(r"A run snapshot was found in storage folder"),
        "gram-ray reads a run's checkpoint registry through Ray Train's Result.from_path (resume_plan, and each "
        "worker group's start), which says so at INFO with advice for starting afresh; whether a run continues is "
        "gram-ray's decision (--resume), and it says so in its own line.",
    ),
    (
        re.compile(r"PYTHON worker processes have been started on node"),
        "the raylet starts more worker processes at once than the machine has cores: gram-ray starts a local Ray "
        "with more logical CPUs than cores (8 on 2 cores) so that Ray Data's tasks and Train's workers never wait "
        "on each other, and a burst of starting workers is that, not a leak (they are reused and reaped).",
    ),
)


def is_harmless(line: str) -> bool:
    return any(pattern.search(line) for pattern, _ in HARMLESS)


class _Log:
    """The log file the harmless lines go to; lines that come before it is known are held, then written."""

    def __init__(self) -> None:
        self.file = None
        self.held: list[str] = []
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        line = line if line.endswith("\n") else line + "\n"
        with self.lock:
            if self.file is None:
                self.held.append(line)
            else:
                self.file.write(line)
                self.file.flush()

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            self.file = path.open("a")
            self.file.writelines(self.held)
            self.file.flush()
            self.held.clear()


class _LoggingFilter(logging.Filter):
    def __init__(self, log: _Log) -> None:
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if is_harmless(message):
            self.log.write(f"{record.levelname} {record.name}: {message}")
            return False
        return True


class _StderrFilter:
    """File descriptor 2 through a pipe: a thread reads it, writes harmless lines to the log and everything else,
    byte for byte and without waiting for a line end on a progress bar's carriage return, to the real stderr."""

    def __init__(self, log: _Log) -> None:
        self.log = log
        self.console = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.reader = os.fdopen(read, "rb", buffering=0)
        self.thread = threading.Thread(target=self._pump, name="gram-ray-stderr-filter", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def close(self) -> None:
        """At exit: stderr back to the console, and what is still in the pipe (a last `Error:` line) shown."""
        sys.stderr.flush()
        os.dup2(self.console, 2)  # the pipe's last write end closes: the reader sees its end
        self.thread.join(timeout=5)

    def _pump(self) -> None:
        pending = b""
        while chunk := self.reader.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._line(line + b"\n")
            if b"\r" in pending:  # a progress bar redrawing itself: show it now
                os.write(self.console, pending)
                pending = b""
        if pending:
            self._line(pending)

    def _line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace")
        if is_harmless(text):
            self.log.write(text)
        else:
            os.write(self.console, raw)


_log: _Log | None = None


def quiet_ray(log_path: str | Path | None = None) -> None:
    """Keep Ray's known-harmless lines of this process off the console. Called before ray.init (without a path:
    its logging is filtered, and what it logs is held) and once more after, with the log file's path (the
    session's logs folder): then held lines are written there, and the core worker's stderr and the error
    listener's prints are filtered too. Each part is installed once per process."""
    global _log
    import ray
    import ray._private.worker as ray_worker

    if _log is None:
        _log = _Log()
        log_filter = _LoggingFilter(_log)
        for handler in logging.getLogger("ray").handlers:
            handler.addFilter(log_filter)
    if log_path is None or _log.file is not None:
        return
    assert ray.is_initialized()
    _log.open(Path(log_path))
    _StderrFilter(_log)
    print_to_stdstream = ray_worker.print_to_stdstream  # what the driver's error listener prints with
    log = _log

    def filtered(data, ignore_prefix: bool):
        lines = data.get("lines", [])
        for line in lines:
            if is_harmless(line):
                log.write(f"({data.get('pid')}) {line}")
        kept = [line for line in lines if not is_harmless(line)]
        if kept:
            print_to_stdstream({**data, "lines": kept}, ignore_prefix)

    ray_worker.print_to_stdstream = filtered

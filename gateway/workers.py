"""``--workers N``: a supervisor process and N gateway worker processes.

One Python process uses one core; TLS and the relay are CPU-bound, so a
gateway with more than one core to spend runs several workers.  Each worker is
a complete ``dicom-gateway run`` (same config file) that binds its listeners
with ``SO_REUSEPORT`` (gateway/listen.py), so the kernel spreads new
connections over the workers with no shared state and no accept lock.  An
association lives and dies in the worker that accepted it.

The supervisor only starts, watches and signals:

* a worker that exits while the supervisor is not stopping is restarted, after
  a back-off that doubles (0.5 s .. 30 s) while workers keep dying young, so a
  worker that cannot start (port taken, certificate gone) does not spin;
* SIGHUP is forwarded: every worker reloads config and certificates itself
  (a worker with a bad new config keeps its old one, as a single process does);
* SIGTERM / SIGINT are forwarded as SIGTERM: every worker stops accepting and
  drains for ``shutdown_grace``; the supervisor waits for all of them (and
  SIGKILLs stragglers 10 s after the grace), then exits 0.

Known limit of SO_REUSEPORT: connections still in a dead worker's accept queue
are reset by the kernel.  Live associations in the other workers are untouched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("gateway")

#: Restart back-off bounds (seconds); reset once a worker lived MIN_UPTIME.
BACKOFF_MIN, BACKOFF_MAX, MIN_UPTIME = 0.5, 30.0, 10.0
#: After the drain grace, how long before stragglers are killed.
KILL_AFTER = 10.0
_POLL = 0.1


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = BACKOFF_MIN
    restart_at: float | None = None


def worker_command(config: str | Path, index: int, log_format: str | None) -> list[str]:
    """The command line of worker ``index`` (a ``run`` with the hidden worker flag)."""
    cmd = [sys.executable, "-m", "gateway", "run", str(config), "--worker-index", str(index)]
    if log_format:
        cmd += ["--log-format", log_format]
    return cmd


class Supervisor:
    """Keeps N workers running until told to stop (see the module docstring)."""

    def __init__(self, config: str | Path, workers: int, *, grace: float,
                 log_format: str | None = None) -> None:
        self.config = config
        self.grace = grace
        self.log_format = log_format
        self.workers = [_Worker(i) for i in range(workers)]
        self._signals: list[int] = []
        self.stopping = False

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only record it: the loop below acts, outside the signal handler.
        self._signals.append(signum)

    def _spawn(self, w: _Worker) -> None:
        cmd = worker_command(self.config, w.index, self.log_format)
        # Workers inherit stdout/stderr: their JSON lines reach the same log sink.
        w.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        w.started = time.monotonic()
        w.restart_at = None
        log.info("worker.spawned", worker=w.index, worker_pid=w.proc.pid)

    def _signal_all(self, signum: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signum)

    def _reap(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None or w.proc.poll() is None:
                continue
            rc, pid, lived = w.proc.returncode, w.proc.pid, now - w.started
            w.proc = None
            if self.stopping:
                log.info("worker.stopped", worker=w.index, worker_pid=pid, rc=rc)
                continue
            w.backoff = BACKOFF_MIN if lived >= MIN_UPTIME else min(w.backoff * 2, BACKOFF_MAX)
            delay = BACKOFF_MIN if lived >= MIN_UPTIME else w.backoff
            w.restart_at = now + delay
            log.warning("worker.died", worker=w.index, worker_pid=pid, rc=rc,
                        uptime_s=round(lived, 1), restart_in_s=delay)

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT and every worker has exited; return 0."""
        previous = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for w in self.workers:
                self._spawn(w)
            log.info("workers.started", workers=len(self.workers), pid=os.getpid())
            deadline: float | None = None
            while True:
                while self._signals:
                    sig = self._signals.pop(0)
                    if sig == signal.SIGHUP:
                        log.info("workers.reload", signal="SIGHUP")
                        self._signal_all(signal.SIGHUP)
                    elif not self.stopping:
                        log.info("workers.stopping", signal=signal.Signals(sig).name)
                        self.stopping = True
                        deadline = time.monotonic() + self.grace + KILL_AFTER
                        self._signal_all(signal.SIGTERM)
                self._reap()
                if self.stopping:
                    if all(w.proc is None for w in self.workers):
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        log.warning("workers.kill", reason="drain took too long")
                        self._signal_all(signal.SIGKILL)
                        deadline = None
                else:
                    now = time.monotonic()
                    for w in self.workers:
                        if w.proc is None and w.restart_at is not None and now >= w.restart_at:
                            self._spawn(w)
                time.sleep(_POLL)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if not self.stopping:  # an exception in the loop: leave no orphans behind
                self._signal_all(signal.SIGTERM)
        log.info("workers.stopped")
        return 0

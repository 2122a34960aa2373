"""Several serving processes on one port, and rolling restarts that drop nothing.

``headwater serve --workers N`` runs a small supervisor: it binds the HTTP port once and
starts N serving processes (``python -m headwater serve``) that inherit the listening
socket (``pass_fds``) and accept from the same kernel queue. A connection the kernel
has accepted waits in that queue until some worker takes it, so a worker that stops
never takes queued connections with it (unlike separate ``SO_REUSEPORT`` sockets, whose
queues die with their owner). The workers spread connections evenly through a shared
board of how many each holds (:mod:`serving.balance`), which the supervisor creates and
hands down like the socket.

Rolling restart (``SIGHUP`` to the supervisor, or :meth:`Supervisor.rolling_restart`):
for each worker in turn, start its replacement, wait until the replacement says it is
ready (it has a model or the baseline and listens), then stop the old one with
``SIGTERM``. A stopping worker (:func:`serving.app.serve`) stops accepting, answers
what it already has with ``Connection: close`` for a drain period, and exits; the
others keep accepting throughout. A worker that dies is restarted.

``SIGTERM``/``SIGINT`` to the supervisor stops every worker the same graceful way.

Lifetime: the supervisor holds no state beyond its children and the board (advisory
counts the workers rewrite as they run; it dies with the supervisor); each worker keeps
its own model and caches (nothing survives a worker's restart but the model store and
Redis).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from core.settings import Settings
from core.signals import on_signals
from serving.balance import BOARD_ENV, CLOSED, LoadBoard

__all__ = ["LISTEN_FD_ENV", "READY_FD_ENV", "Supervisor", "run_workers"]

log = logging.getLogger(__name__)

#: environment variables through which a worker finds its inherited socket and ready pipe
LISTEN_FD_ENV = "HEADWATER_SERVE_LISTEN_FD"
READY_FD_ENV = "HEADWATER_SERVE_READY_FD"
REPO = Path(__file__).resolve().parents[1]


def bind_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """The shared listening socket (inheritable, so workers can be handed it)."""
    sock = socket.create_server((host, port), reuse_port=False, backlog=backlog)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Starts, watches and restarts ``n`` serving workers on one listening socket."""

    def __init__(
        self,
        settings: Settings,
        n: int,
        *,
        ready_timeout: float = 120.0,
        stop_timeout: float = 30.0,
        argv: list[str] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"workers must be >= 1, got {n}")
        self.settings = settings
        self.n = n
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.argv = argv or [sys.executable, "-m", "headwater", "serve"]
        self.sock = bind_socket(settings.bind_host, settings.http_port)
        # each worker's open connections, so a burst of connections is spread evenly
        # (serving.balance); two slots per index: a replacement starts beside the old one
        self.board = LoadBoard.create(2 * n)
        self.workers: list[subprocess.Popen | None] = [None] * n
        self._slots: dict[int, int] = {}  # worker pid -> its board slot
        self.restarts = 0
        self._lock = threading.Lock()
        self._stopping = False

    # -- one worker -----------------------------------------------------------------
    def _free_slot(self, index: int) -> int:
        """The board slot for a new worker at ``index``: the one its predecessor (if any,
        still running during a rolling restart) does not use."""
        taken = set(self._slots.values())
        return index if index not in taken else index + self.n

    def _release(self, proc: subprocess.Popen) -> None:
        """A stopped worker's slot: closed (it may have died without saying so)."""
        slot = self._slots.pop(proc.pid, None)
        if slot is not None:
            self.board.set(slot, CLOSED)

    def _spawn(self, index: int) -> subprocess.Popen:
        """Start worker ``index``; return once it reported ready (or raise)."""
        slot = self._free_slot(index)
        self.board.set(slot, CLOSED)
        r, w = os.pipe()
        env = dict(
            os.environ,
            **{
                LISTEN_FD_ENV: str(self.sock.fileno()),
                READY_FD_ENV: str(w),
                "HEADWATER_SERVE_WORKERS": "1",  # a worker is never a supervisor itself
                "HEADWATER_SERVE_WORKER_INDEX": str(index),
                BOARD_ENV: f"{self.board.fileno()}:{self.board.slots}:{slot}",
            },
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        try:
            proc = subprocess.Popen(
                self.argv, env=env, pass_fds=(self.sock.fileno(), self.board.fileno(), w),
                cwd=REPO,
            )
        finally:
            os.close(w)
        self._slots[proc.pid] = slot
        try:
            deadline = time.monotonic() + self.ready_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    proc.kill()
                    proc.wait()
                    self._release(proc)
                    raise RuntimeError(
                        f"serving worker {index} not ready within {self.ready_timeout:g}s"
                    )
                ready, _, _ = select.select([r], [], [], min(left, 0.5))
                if ready:
                    if os.read(r, 64):
                        return proc
                    # EOF: the worker closed the pipe without saying ready, so it died
                    proc.wait()
                    self._release(proc)
                    raise RuntimeError(
                        f"serving worker {index} exited with {proc.returncode} before ready"
                    )
        finally:
            os.close(r)

    def _stop(self, proc: subprocess.Popen) -> int | None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("serving worker %s did not stop in %ss: killed", proc.pid, self.stop_timeout)
            proc.kill()
            return proc.wait()
        finally:
            self._release(proc)

    # -- all of them ------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.n):
            self.workers[i] = self._spawn(i)
        log.info(
            "serving on http://%s:%s with %d workers: pids %s",
            self.settings.bind_host, self.settings.http_port, self.n,
            [p.pid for p in self.workers if p],
        )

    def rolling_restart(self) -> None:
        """Replace every worker, one at a time: the new one is ready before the old stops."""
        with self._lock:
            for i in range(self.n):
                if self._stopping:
                    return
                old = self.workers[i]
                self.workers[i] = self._spawn(i)
                if old is not None:
                    self._stop(old)
                self.restarts += 1
                log.info("serving worker %d replaced (pid %s)", i, self.workers[i].pid)

    def reap(self) -> None:
        """Restart workers that died or failed to start (not while stopping); a worker
        that cannot start is logged and tried again at the next call."""
        with self._lock:
            for i, p in enumerate(self.workers):
                if self._stopping:
                    return
                if p is not None and p.poll() is None:
                    continue
                if p is not None:
                    log.warning("serving worker %d (pid %s) exited with %s: restarting",
                                i, p.pid, p.returncode)
                    self._release(p)
                self.workers[i] = None
                try:
                    self.workers[i] = self._spawn(i)
                except RuntimeError as exc:
                    log.error("serving worker %d could not be restarted: %s", i, exc)

    def begin_stop(self) -> None:
        """Refuse new restarts from now on (takes no lock: safe in a signal handler); a
        rolling restart in progress ends after its current worker."""
        self._stopping = True

    def stop(self) -> None:
        self.begin_stop()
        with self._lock:
            procs = [p for p in self.workers if p is not None]
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                self._stop(p)
            self.sock.close()
            self.board.close()


def run_workers(settings: Settings) -> int:
    """``headwater serve --workers N``: supervise N workers until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sup = Supervisor(settings, settings.serve_workers)
    stop = threading.Event()
    restart = threading.Event()

    def _stop(_signum: int) -> None:
        sup.begin_stop()  # a rolling restart in progress ends after its current worker
        stop.set()

    on_signals({signal.SIGTERM: _stop, signal.SIGINT: _stop,
                signal.SIGHUP: lambda _signum: restart.set()})
    try:
        sup.start()
        while not stop.wait(0.5):
            if restart.is_set():
                restart.clear()
                log.info("SIGHUP: rolling restart of %d serving workers", sup.n)
                sup.rolling_restart()
            sup.reap()
    finally:
        sup.stop()
    return 0

"""core.signals: a burst of signals, also two at once, never deadlocks a process whose main
thread waits on the very event the signals' actions set (a learner group once hung on
stop: a handler called ``Event.set`` while its own thread held the event's lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.stackutil import REPO

CHILD = textwrap.dedent("""
    import signal, sys, threading
    sys.path.insert(0, {repo!r})
    from core.signals import on_signals

    poke, stop = threading.Event(), threading.Event()
    seen = []

    def _poke(signum):
        seen.append(signum)
        poke.set()
        poke.clear()

    {install}
    print("ready", flush=True)
    while not stop.is_set():
        poke.wait(0.0002)  # the main thread holds poke's lock at many points of this loop
    print("stopped", len(seen), flush=True)
""")

SAFE = "on_signals({signal.SIGUSR1: _poke, signal.SIGTERM: lambda s: stop.set()})"


def _burst(install: str, pairs: int) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), install=install)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout.readline().strip() == "ready"
    for _ in range(pairs):
        if child.poll() is not None:
            break
        os.kill(child.pid, signal.SIGUSR1)
        os.kill(child.pid, signal.SIGUSR1)  # two at once, as killpg plus a forwarding parent
        time.sleep(0.001)
    if child.poll() is None:
        os.kill(child.pid, signal.SIGTERM)
    return child


def test_a_burst_of_signals_is_handled_and_the_stop_still_arrives():
    child = _burst(SAFE, pairs=2000)
    try:
        out, _ = child.communicate(timeout=60)  # a hang guard only: a healthy child exits at once
    finally:
        child.kill()
    assert child.returncode == 0
    words = out.split()
    assert words[0] == "stopped"
    assert int(words[1]) > 0  # the actions ran (signals may coalesce, so not all 4000)


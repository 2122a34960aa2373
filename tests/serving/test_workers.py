"""The serving supervisor with small real worker processes (aiohttp, no model): start on
one shared socket, restart a worker killed with -9, stop everything."""

from __future__ import annotations

import collections
import http.client
import os
import signal
import sys
import textwrap
import urllib.request

import pytest

from core.settings import Settings
from headwater.servers import free_port
from serving.balance import CLOSED
from serving.workers import Supervisor

pytestmark = [pytest.mark.faults]

WORKER = textwrap.dedent('''
    import asyncio, os, signal, socket
    from aiohttp import web
    from serving.app import _say_ready

    async def hello(request):
        return web.Response(text=str(os.getpid()))

    async def main():
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        sock = socket.socket(fileno=int(os.environ["HEADWATER_SERVE_LISTEN_FD"]))
        await web.SockSite(runner, sock).start()
        _say_ready()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())
''')


# as WORKER, but accepting like serving does (serving/balance.py), with a wait long
# enough that the split comes from the board and never from who wakes first
BALANCED_WORKER = WORKER.replace(
    "from serving.app import _say_ready\n",
    "from serving.app import _say_ready\n"
    "from serving.balance import BalancedAcceptor, board_from_env\n",
).replace(
    "await web.SockSite(runner, sock).start()\n",
    "board, slot = board_from_env()\n"
    "    acceptor = BalancedAcceptor(sock, runner.server, lambda: len(runner.server.connections),\n"
    "                                board, slot, max_defer=10.0)\n"
    "    acceptor.start()\n",
).replace("await runner.cleanup()\n", "await acceptor.stop()\n    await runner.cleanup()\n")
assert "BalancedAcceptor(" in BALANCED_WORKER and "acceptor.stop()" in BALANCED_WORKER


def _holders(port: int, n: int) -> collections.Counter:
    """Open ``n`` keep-alive connections at once, then count which worker holds each."""
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(n)]
    try:
        for c in conns:
            c.connect()  # queued by the kernel, accepted by some worker
        pids = collections.Counter()
        for c in conns:
            c.request("GET", "/")
            pids[c.getresponse().read().decode()] += 1
        return pids
    finally:
        for c in conns:
            c.close()


def test_connections_opened_at_once_are_split_evenly_across_workers(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(BALANCED_WORKER)
    port = free_port()
    sup = Supervisor(Settings(http_port=port), 2, argv=[sys.executable, str(script)])
    try:
        sup.start()
        first = sup.board.values()
        assert sorted(_holders(port, 16).items()) == sorted((str(p.pid), 8) for p in sup.workers)
        sup.rolling_restart()
        # the replacements took the other slots; their predecessors' slots are closed
        after = sup.board.values()
        assert [first[i] != CLOSED for i in range(4)] == [True, True, False, False]
        assert [after[i] != CLOSED for i in range(4)] == [False, False, True, True]
        assert sorted(_holders(port, 16).items()) == sorted((str(p.pid), 8) for p in sup.workers)
    finally:
        sup.stop()


def _answering_pids(port: int, want: int, tries: int = 200) -> set[str]:
    """Worker pids seen answering on fresh connections (the kernel spreads them)."""
    seen: set[str] = set()
    for _ in range(tries):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            seen.add(r.read().decode())
        if len(seen) >= want:
            break
    return seen


def test_supervisor_shares_one_socket_restarts_a_dead_worker_and_stops(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    sup = Supervisor(Settings(http_port=port), 2, argv=[sys.executable, str(script)])
    try:
        sup.start()
        pids = {str(p.pid) for p in sup.workers}
        # every answer comes from one of the two workers on the one port
        assert _answering_pids(port, 2) <= pids
        dead = sup.workers[0].pid
        os.kill(dead, signal.SIGKILL)
        sup.workers[0].wait()
        # the other worker answers meanwhile: the socket outlives any one worker
        assert _answering_pids(port, 1) == {str(sup.workers[1].pid)}
        sup.reap()
        assert sup.workers[0].pid != dead and sup.workers[0].poll() is None
        assert _answering_pids(port, 2, tries=50) <= {str(p.pid) for p in sup.workers}
    finally:
        sup.stop()
    assert all(p.poll() is not None for p in sup.workers)
    with pytest.raises(OSError):  # nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)

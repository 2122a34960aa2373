"""Connections spread over workers sharing one listening socket (serving/balance.py).

Two acceptors in one event loop stand for two worker processes: each watches its own
descriptor of the same listening socket (one kernel accept queue, as after ``pass_fds``)
and they share a real :class:`LoadBoard`. Every server here answers with its own name.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from aiohttp import web

from serving.balance import CLOSED, BalancedAcceptor, LoadBoard, board_from_env


async def _server(name: str) -> tuple[web.AppRunner, web.Server]:
    async def who(_request: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/", who)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    return runner, runner.server


def _acceptor(sock: socket.socket, server: web.Server, board: LoadBoard, slot: int,
              **kw) -> BalancedAcceptor:
    dup = socket.socket(fileno=os.dup(sock.fileno()))  # a worker's own descriptor
    return BalancedAcceptor(dup, server, lambda: len(server.connections), board, slot, **kw)


async def _connect_and_ask(port: int, n: int, *, keep: list | None = None) -> list[str]:
    """Open ``n`` keep-alive connections at once, then ask each who holds it; close them
    unless ``keep`` is given (their writers are put there)."""
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(n)))
    names = []
    for reader, writer in conns:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        names.append((await reader.readexactly(length)).decode())
    for _reader, writer in conns:
        if keep is None:
            writer.close()
        else:
            keep.append(writer)
    return names


@pytest.fixture
def listening():
    sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    yield sock, sock.getsockname()[1]
    sock.close()


async def test_a_burst_of_connections_is_split_evenly(listening):
    sock, port = listening
    board = LoadBoard.create(2)
    (ra, sa), (rb, sb) = await _server("a"), await _server("b")
    # a generous wait: the split must come from the board, not from who wakes first
    a = _acceptor(sock, sa, board, 0, max_defer=5.0)
    b = _acceptor(sock, sb, board, 1, max_defer=5.0)
    a.start()
    b.start()
    writers: list = []
    try:
        names = await _connect_and_ask(port, 16, keep=writers)
        assert sorted(names) == ["a"] * 8 + ["b"] * 8
        assert a.accepted == b.accepted == 8
        assert a.forced == b.forced == 0
        # while accepting, each slot holds its worker's open connections
        assert board.values() == [8, 8]
    finally:
        for w in writers:
            w.close()
        await a.stop()
        await b.stop()
        await ra.cleanup()
        await rb.cleanup()
        stopped = board.values()
        board.close()
    assert stopped == [CLOSED, CLOSED]


async def test_a_worker_that_does_not_accept_delays_a_connection_only_by_the_bound(listening):
    sock, port = listening
    board = LoadBoard.create(2)
    board.set(1, 0)  # a worker that says it accepts and holds nothing, but never takes one
    runner, server = await _server("a")
    a = _acceptor(sock, server, board, 0, max_defer=0.05, recheck=0.005)
    a.start()
    try:
        # the first connection is taken at once (a holds no more than the other); each
        # later one waits for the silent worker, then is accepted anyway
        names = await _connect_and_ask(port, 3)
        assert names == ["a", "a", "a"]
        assert a.accepted == 3
        assert a.forced >= 1
        assert a.deferred >= a.forced
    finally:
        await a.stop()
        await runner.cleanup()
        board.close()


async def test_a_closed_slot_is_never_waited_for(listening):
    sock, port = listening
    board = LoadBoard.create(3)
    board.set(2, CLOSED)  # e.g. a worker draining for a rolling restart
    (ra, sa), (rb, sb) = await _server("a"), await _server("b")
    a = _acceptor(sock, sa, board, 0, max_defer=5.0)
    b = _acceptor(sock, sb, board, 1, max_defer=5.0)
    a.start()
    b.start()
    await b.stop()  # b drains: its slot closes and it takes nothing more
    try:
        assert board.values()[1] == CLOSED
        names = await _connect_and_ask(port, 4)
        assert names == ["a"] * 4
        assert a.deferred == a.forced == 0
    finally:
        await a.stop()
        await ra.cleanup()
        await rb.cleanup()
        board.close()


def test_the_board_is_read_from_the_environment_or_refused():
    board = LoadBoard.create(4)
    try:
        got, slot = board_from_env({"HEADWATER_SERVE_LOAD_BOARD": f"{board.fileno()}:4:3"})
        got.set(3, 7)
        assert (board.values()[3], slot) == (7, 3)
        got.close()
        assert board_from_env({}) is None
        with pytest.raises(ValueError, match="HEADWATER_SERVE_LOAD_BOARD must be 'fd:slots:slot'"):
            board_from_env({"HEADWATER_SERVE_LOAD_BOARD": "seven"})
    finally:
        board.close()

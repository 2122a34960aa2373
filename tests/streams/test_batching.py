"""Adaptive takes (streams.batching) and the pipelined agent (streams.app.pipelined_takes)."""

from __future__ import annotations

import asyncio

import pytest

from headwater.testing import AgentHarness
from streams.app import batched_agent
from streams.batching import Batcher, TakePolicy
from streams.events import MemoryLog


def run(coro):
    return asyncio.run(coro)


def test_take_is_bounded_in_events_and_a_heavy_message_is_a_take_of_its_own():
    async def go():
        b = Batcher(max_events=10, max_messages=100, within=1.0, gap=0.001, capacity=100)
        for i, w in enumerate([4, 4, 4, 25, 1]):
            await b.put(i, w)
        b.close()
        return [t async for t in b.takes()]

    assert run(go()) == [[0, 1], [2], [3], [4]]


def test_take_is_bounded_in_messages():
    async def go():
        b = Batcher(max_events=1000, max_messages=3, within=1.0, gap=0.001, capacity=100)
        for i in range(7):
            await b.put(i, 1)
        b.close()
        return [t async for t in b.takes()]

    assert run(go()) == [[0, 1, 2], [3, 4, 5], [6]]


def test_lone_message_waits_the_gap_not_within():
    async def go():
        b = Batcher(max_events=1000, max_messages=1000, within=60.0, gap=0.01)
        await b.put("a", 1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        batch = await b.take()
        return batch, loop.time() - t0

    batch, waited = run(go())
    assert batch == ["a"]
    assert waited < 30.0, "an idle stream's message must not wait for within (60 s)"


def test_take_keeps_collecting_while_messages_arrive():
    async def go():
        # Closes when full (six messages): it lingered while they kept coming, however
        # slowly this machine runs the feeder (the gap is far longer than its pauses), and
        # closes the moment the sixth arrives, not a gap later (the bound below is a hang
        # guard: without the wake-up on full the take waits the whole hour).
        b = Batcher(max_events=1000, max_messages=6, within=3600.0, gap=3600.0)

        async def trickle():
            for i in range(1, 6):
                await asyncio.sleep(0.005)
                await b.put(i, 1)

        await b.put(0, 1)
        feeder = asyncio.ensure_future(trickle())
        batch = await asyncio.wait_for(b.take(), 120)
        await feeder
        return batch

    assert run(go()) == [0, 1, 2, 3, 4, 5]


def test_take_keeps_collecting_under_a_backlog_even_when_delivery_pauses():
    async def go():
        # A pause far longer than the gap: without a backlog the take would close on [0].
        b = Batcher(max_events=1000, max_messages=2, within=0.001, gap=0.001, backlog=lambda: True,
                    within_backlog=60.0)

        async def late():
            await asyncio.sleep(0.05)
            await b.put(1, 1)

        await b.put(0, 1)
        feeder = asyncio.ensure_future(late())
        batch = await b.take()
        await feeder
        return batch

    assert run(go()) == [0, 1]


def test_put_waits_for_room_and_raises_what_the_consumer_failed_with():
    async def go():
        b = Batcher(max_events=2, max_messages=10, within=1.0, gap=0.0, capacity=2)
        await b.put(0, 1)
        await b.put(1, 1)
        blocked = asyncio.ensure_future(b.put(2, 1))
        await asyncio.sleep(0.01)
        assert not blocked.done(), "full: the stream must wait (back-pressure)"
        assert await b.take() == [0, 1]
        await asyncio.wait_for(blocked, 1.0)
        b.fail(ValueError("handler died"))
        with pytest.raises(ValueError, match="handler died"):
            await b.put(3, 1)

    run(go())


class SlowSink(MemoryLog):
    """Records what was acknowledged when each send started, and lets sends overlap."""

    def __init__(self, harness: AgentHarness) -> None:
        super().__init__()
        self.harness = harness
        self.acked_at_send: list[int] = []

    async def send(self, outputs):
        self.acked_at_send.append(len(self.harness.acked))
        await asyncio.sleep(0.01)
        await super().send(outputs)


def test_pipelined_agent_acks_each_take_only_after_its_outputs_in_order():
    handled: list[list[int]] = []

    async def handler(topic, partition, messages):
        handled.append([offset for offset, _, _ in messages])
        await asyncio.sleep(0)
        return [("out", None, value, partition) for _, _, value in messages]

    harness = AgentHarness()
    sink = SlowSink(harness)
    policy = TakePolicy(max_events=3, max_messages=100, within=0.5, gap=0.001, depth=2)
    batched_agent(harness, "clicks", 1, handler, 100, 0.01, "clicks", sink=sink, take=policy)
    batch = [(0, offset, None, b"%d" % offset) for offset in range(10)]
    run(harness.feed("clicks", [batch]))
    assert [o for t in handled for o in t] == list(range(10)), "handled in offset order, once"
    assert all(len(t) <= 3 for t in handled), "takes bounded in events"
    assert sink.messages("out", 0) == [b"%d" % o for o in range(10)], "outputs in take order"
    assert harness.acked == [("clicks", 0, o) for o in range(10)], "every message acked, in order"
    # An offset is acknowledged only after its take's outputs were sent: when take k's
    # send starts, exactly the messages of the takes before it are acknowledged.
    sizes = [len(t) for t in handled]
    assert sink.acked_at_send == [sum(sizes[:k]) for k in range(len(sizes))]


def test_pipelined_agent_counts_envelopes_by_their_events():
    takes: list[int] = []

    async def handler(topic, partition, messages):
        takes.append(len(messages))
        return []

    harness = AgentHarness()
    policy = TakePolicy(max_events=4, max_messages=100, within=0.5, gap=0.001)
    batched_agent(harness, "clicks", 1, handler, 100, 0.01, "clicks", sink=MemoryLog(), take=policy)
    envelope = b'[{"event_id": "a"}, {"event_id": "b"}, {"event_id": "c"}]'
    run(harness.feed("clicks", [[(0, o, None, envelope) for o in range(4)]]))
    assert takes == [1, 1, 1, 1], "three events per message: one message per take of four events"
    assert len(harness.acked) == 4

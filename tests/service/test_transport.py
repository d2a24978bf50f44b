"""`service.transport`: a response's writes leave as one, in order, and nothing is lost."""

from __future__ import annotations

import asyncio
import functools

from service.transport import JOIN_BYTES, CoalescingTransport


class RecordingTransport:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 8000) if name == "sockname" else default


async def a_turn() -> None:
    await asyncio.sleep(0)  # callbacks scheduled with call_soon run before this returns


def on_a_loop(test):
    """Run the coroutine function `test` on a fresh event loop (a plain test for pytest)."""

    @functools.wraps(test)
    def run():
        asyncio.run(test())

    return run


async def transports() -> tuple[RecordingTransport, CoalescingTransport]:
    """(the connection's transport, the coalescing one around it), on the running loop."""
    inner = RecordingTransport()
    return inner, CoalescingTransport(inner, asyncio.get_running_loop())


@on_a_loop
async def test_headers_and_body_written_in_one_turn_leave_as_one_write():
    inner, outer = await transports()
    outer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert inner.writes == []  # held back for the body
    outer.write(b"{}")
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    await a_turn()
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]


@on_a_loop
async def test_a_lone_write_leaves_at_the_end_of_the_turn():
    inner, outer = await transports()
    outer.write(b"one")
    await a_turn()
    assert inner.writes == [b"one"]
    outer.write(b"a")
    outer.write(b"b")
    outer.write(b"c")  # a third write is held until the next, or the end of the turn
    assert inner.writes == [b"one", b"ab"]
    await a_turn()
    assert inner.writes == [b"one", b"ab", b"c"]


@on_a_loop
async def test_large_writes_are_not_copied_to_be_joined_and_keep_their_order():
    large = b"x" * JOIN_BYTES
    inner, outer = await transports()
    outer.write(large)  # nothing held: sent at once
    assert inner.writes == [large]
    outer.write(b"head")
    outer.write(large)
    assert inner.writes == [large, b"head", large]
    await a_turn()
    assert inner.writes == [large, b"head", large]


@on_a_loop
async def test_close_sends_what_is_held_first_and_a_closing_connection_gets_nothing():
    inner, outer = await transports()
    outer.write(b"last words")
    outer.close()
    assert inner.writes == [b"last words"] and inner.closing
    outer.write(b"too late")
    await a_turn()
    assert inner.writes == [b"last words"]


@on_a_loop
async def test_other_attributes_are_the_wrapped_transports():
    inner, outer = await transports()
    assert outer.get_extra_info("sockname") == ("127.0.0.1", 8000)
    assert outer.is_closing() is False

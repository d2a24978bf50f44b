"""Large JSON bodies are parsed in a child process: its answers, its errors, its death."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from service.errors import InvalidInput, NotReady
from service.parsing import JsonParser


def rows_of(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32).reshape(-1, 2)


def refuse(message: str):
    raise InvalidInput(message, code="too_many_rows")


def die():
    os._exit(3)


def child_pid() -> int:
    return os.getpid()


@pytest.fixture
def parser():
    parser = JsonParser()
    yield parser
    parser.close()


def test_the_child_returns_arrays_and_raises_client_errors_with_their_code(parser):
    async def scenario():
        array = await parser.run(rows_of, 6)
        with pytest.raises(InvalidInput) as refused:
            await parser.run(refuse, "at most 4 rows")
        return array, refused.value, await parser.run(child_pid)

    array, error, pid = asyncio.run(scenario())
    np.testing.assert_array_equal(array, rows_of(6))
    assert (error.code, error.message) == ("too_many_rows", "at most 4 rows")
    assert error.status_code == 422
    assert pid != os.getpid()


def test_a_child_that_dies_is_a_503_and_the_next_parse_gets_a_new_child(parser):
    async def scenario():
        first = await parser.run(child_pid)
        with pytest.raises(NotReady) as stopped:
            await parser.run(die)
        return first, stopped.value, await parser.run(child_pid)

    first, error, second = asyncio.run(scenario())
    assert (error.status_code, error.code) == (503, "parser_unavailable")
    assert second != first

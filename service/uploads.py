"""Dictionary uploads, streamed to a file in the store's staging area as they arrive: a large
body is never held in memory; it is read back through a memory map (`formats`)."""

from __future__ import annotations

import contextlib
import errno
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from .errors import InsufficientStorage, TooLarge

WRITE_BYTES = 4 << 20
"""Received chunks are written to disk (on a worker thread) this many bytes at a time."""


def check_disk(request: Request, *directories: Path) -> None:
    """507 when the body's announced length does not fit the free space of `directories`."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        return
    for directory in directories:
        free = shutil.disk_usage(directory).free
        if int(length) > free:
            raise InsufficientStorage(
                f"the upload ({int(length)} bytes) does not fit the {free} bytes free under "
                f"{directory}; free some disk space or send only the decoder (W_dec, b_dec)"
            )


@contextlib.asynccontextmanager
async def spooled(request: Request, directory: Path) -> AsyncIterator[Path]:
    """The request body, written to a new file in `directory` (removed on exit; memory maps of
    it stay valid until they are dropped)."""
    check_disk(request, directory)
    with tempfile.NamedTemporaryFile(dir=directory, prefix="upload.") as file:
        pending: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                pending.append(chunk)
                size += len(chunk)
                if size >= WRITE_BYTES:
                    await run_in_threadpool(_write, file, pending)
                    pending, size = [], 0
            await run_in_threadpool(_write, file, pending)
            file.flush()
        except OSError as error:
            if error.errno == errno.ENOSPC:
                with contextlib.suppress(OSError):
                    file.close()  # else closing would flush what is buffered: ENOSPC, a 500
                raise InsufficientStorage(
                    f"the disk under {directory} filled up while the upload was written; free "
                    "some disk space or send only the decoder (W_dec, b_dec)"
                ) from None
            raise
        yield Path(file.name)


def _write(file, chunks: list[bytes]) -> None:
    for chunk in chunks:
        file.write(chunk)


async def read_capped(request: Request, limit: int, advice: str) -> bytes:
    """The whole body, refused (413) as soon as it is known to pass `limit` bytes."""
    error = TooLarge(
        f"the request body exceeds the limit of {limit} bytes; {advice}", code="body_too_large"
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise error
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise error
        chunks.append(chunk)
    return b"".join(chunks)

"""The service end of the readout channel: per-request readings pushed by the worker each step.

The worker (rank 0) sends, after every forward, one message listing for each request in the step the
first position it computed, the readings of its tokens by name, gates that latched, and any error.
They travel over a ZeroMQ PUSH/PULL pair on an ``ipc://`` socket in a private temporary directory (the
service binds, the worker connects; nothing is written to disk but the socket inode). Token outputs
travel on vLLM's own path, so the two can arrive in either order: a stream waits, bounded, until the
readings for the position that predicted a token have arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class RequestReadouts:
    """What has arrived for one request: readings by position, gates, an error."""

    values: dict[int, dict[str, float]] = field(default_factory=dict)
    gates: list[tuple[str, bool, int]] = field(default_factory=list)  # (name, on prompt, index in series)
    error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, first: int, values: dict[str, list[float]], gates: list[tuple[str, bool, int]],
            error: str | None) -> None:
        for name, series in values.items():
            for k, v in enumerate(series):
                # setdefault: a preempted request is recomputed; its first readings stand
                self.values.setdefault(first + k, {}).setdefault(name, v)
        self.gates.extend(gates)
        self.error = self.error or error
        self.changed.set()

    def has(self, position: int, names: set[str]) -> bool:
        got = self.values.get(position)
        return got is not None and names <= got.keys()

    async def wait_for(self, positions: range, names: set[str], timeout: float) -> bool:
        """True once every position has every name (or an error came); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.error is None and not all(self.has(p, names) for p in positions):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return True


class ReadoutChannel:
    """Binds the PULL socket and routes messages to the open requests' buffers."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="steerwatch-readouts-")
        self.address = f"ipc://{self._dir}/readouts"
        self._open: dict[str, RequestReadouts] = {}
        self._socket: Any = None
        self._task: asyncio.Task[None] | None = None
        self.messages = 0

    async def start(self) -> None:
        import zmq
        import zmq.asyncio

        self._socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.address)
        self._task = asyncio.create_task(self._pump(), name="steerwatch-readouts")

    def open(self, corr: str) -> RequestReadouts:
        buf = RequestReadouts()
        self._open[corr] = buf
        return buf

    def close(self, corr: str) -> None:
        self._open.pop(corr, None)

    @property
    def open_count(self) -> int:
        return len(self._open)

    async def _pump(self) -> None:
        while True:
            msg = await self._socket.recv_pyobj()
            self.messages += 1
            for corr, first, values, gates, error in msg:
                buf = self._open.get(corr)
                if buf is not None:  # a request already closed (cancelled) is dropped
                    buf.add(first, values, gates, error)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._socket is not None:
            self._socket.close(0)
        shutil.rmtree(self._dir, ignore_errors=True)

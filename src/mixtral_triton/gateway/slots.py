"""The bound on generations in flight (--max-concurrency), one for the whole pod however many
worker processes serve it: a Linux eventfd in semaphore mode whose counter is the number of
free slots. Every worker holds the same file descriptor (inherited from the supervisor,
gateway/workers.py), so taking a slot is one non-blocking read of it, giving one back one
write, both atomic in the kernel across processes; a request that finds none waits on the
descriptor in its own event loop (readable = a slot is free) for at most --queue-wait seconds.

Each worker also writes how many slots it holds into its cell of a shared array, so that the
supervisor can give back the slots of a worker that died holding them.
"""

from __future__ import annotations

import asyncio
import collections
import mmap
import os
import struct

_CELL = struct.Struct("<q")


class Slots:
    def __init__(self, limit: int, fd: int | None = None, held: mmap.mmap | None = None, cell: int = 0):
        self.fd = fd if fd is not None else new_slots_fd(limit)
        self._held_map = held
        self._offset = cell * _CELL.size
        self.held = 0  # this process's slots
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._watching: asyncio.AbstractEventLoop | None = None

    def try_acquire(self) -> bool:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return False
        self._count(1)
        return True

    def release(self) -> None:
        self._count(-1)
        os.eventfd_write(self.fd, 1)

    def take_now(self) -> bool:
        """A free slot, unless requests of this process are waiting for one (they come first)."""
        return not self._waiters and self.try_acquire()

    async def acquire(self, wait_s: float) -> bool:
        """Take a slot, waiting up to `wait_s` for one (first come, first served within this
        process); False if none came free in time."""
        if self.take_now():
            return True
        if wait_s <= 0:
            return False
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        if self._watching is None:
            loop.add_reader(self.fd, self._hand_out)
            self._watching = loop
        try:
            async with asyncio.timeout(wait_s):
                await waiter
            return True
        except TimeoutError:
            # handed a slot just as the wait ran out: it is ours
            return waiter.done() and not waiter.cancelled()
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()
            raise

    def _hand_out(self) -> None:
        """The descriptor is readable: give free slots to the waiters in order (another
        worker may take a slot first; then this one waits on)."""
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.done():  # its wait ended
                self._waiters.popleft()
                continue
            if not self.try_acquire():
                return
            self._waiters.popleft()
            waiter.set_result(None)
        self._watching.remove_reader(self.fd)
        self._watching = None

    def _count(self, change: int) -> None:
        self.held += change
        if self._held_map is not None:
            _CELL.pack_into(self._held_map, self._offset, self.held)


def new_slots_fd(limit: int) -> int:
    """(Close-on-exec: the supervisor hands it to its workers with subprocess's pass_fds.)"""
    return os.eventfd(limit, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def held_map(fd: int, cells: int) -> mmap.mmap:
    """The shared array of slots held per worker, on a memfd of `cells` cells."""
    return mmap.mmap(fd, cells * _CELL.size)


def new_held_fd(cells: int) -> int:
    fd = os.memfd_create("mixtral-gateway-slots")
    os.ftruncate(fd, cells * _CELL.size)
    return fd


def take_back(held: mmap.mmap, cell: int, slots_fd: int) -> int:
    """Give back the slots a dead worker held; returns how many."""
    offset = cell * _CELL.size
    (count,) = _CELL.unpack_from(held, offset)
    if count > 0:
        os.eventfd_write(slots_fd, count)
    _CELL.pack_into(held, offset, 0)
    return count

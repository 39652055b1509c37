"""Fault injectors for tests: real network faults on loopback, not mocks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


class TcpProxy:
    """A loopback TCP relay to a server that can be taken down and brought back (an outage), or made to drop its
    open connections (a network blip). ``bytes_per_second`` caps the relay's total throughput (a slow link)."""

    def __init__(self, target: tuple[str, int], bytes_per_second: float | None = None) -> None:
        self.target = target
        self.port = 0
        self.bytes_per_second = bytes_per_second
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._link_lock = threading.Lock()
        self._link_free_at = 0.0

    def up(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(16)
        self.port = ls.getsockname()[1]
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave it listening.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self._conns.clear()

    def drop_connections(self) -> None:
        """Reset the open connections but keep accepting new ones."""
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    @contextlib.contextmanager
    def outage(self, seconds: float) -> Iterator[None]:
        """Down now, back after ``seconds`` (in a thread), on the same port; waits for the way back on exit."""
        self.down()
        timer = threading.Timer(seconds, self.up)
        timer.start()
        try:
            yield
        finally:
            timer.join()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _throttle(self, size: int) -> None:
        """Wait for this chunk's turn on the shared link."""
        if not self.bytes_per_second:
            return
        with self._link_lock:
            now = time.monotonic()
            start = max(now, self._link_free_at)
            self._link_free_at = start + size / self.bytes_per_second
            wait = self._link_free_at - now
        time.sleep(wait)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._throttle(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

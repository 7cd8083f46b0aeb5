"""A TCP forwarder in front of a real server that a test can take down and bring back.

The fault tests put it between the platform and its services (the moto S3 server, an MLflow
tracking server). While it is *down*, every new connection is reset as soon as it opens and
every open one is reset too, which is what a client sees of a crashed or restarting server, so
each client-side retry path runs for real; *up* again, it forwards as before. The server behind
it keeps its state (a stopped and restarted moto, which lives in memory, would not).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

__all__ = ["FlakyProxy"]

_CHUNK = 1 << 16


class FlakyProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` (``(host, port)``), except while down.

    ``refused`` counts the connections reset because of an outage, so a test can show that the
    client actually met it.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.refused = 0
        self._up = True
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name=f"flaky-proxy-{self.port}").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        """Reset every open connection, and every new one until :meth:`up`."""
        with self._lock:
            self._up = False
            live, self._live = self._live, set()
            self.refused += len(live) // 2
        for sock in live:
            _reset(sock)

    def up(self) -> None:
        with self._lock:
            self._up = True

    @contextlib.contextmanager
    def outage(self, seconds: float) -> Iterator[None]:
        """Down for ``seconds`` (after the block), then up again, also if the block raises."""
        self.down()
        try:
            yield
            time.sleep(seconds)
        finally:
            self.up()

    def close(self) -> None:
        self.down()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                refuse = not self._up
                self.refused += refuse
            if refuse:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                refuse = not self._up  # went down while the upstream connection was opened
                self.refused += refuse
                if not refuse:
                    self._live.update((client, server))
            if refuse:
                _reset(client)
                _reset(server)
                continue
            pumps_left = [2]  # the second pump of the pair to end closes both sockets
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target, pumps_left), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, pumps_left: list[int]) -> None:
        try:
            while data := source.recv(_CHUNK):
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)  # pass on a half-close
        except OSError:
            # One side is gone: end the other direction too, or its pump would wait forever.
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            pumps_left[0] -= 1
            if pumps_left[0]:
                return
            self._live.discard(source)
            self._live.discard(target)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.close()


def _reset(sock: socket.socket) -> None:
    """Drop a connection as a crashed server would: the peer's pending read fails at once.

    ``shutdown`` first: a bare ``close`` while a pump thread is blocked in ``recv`` on the same
    socket does not end the connection on Linux, and the client would wait for its read timeout
    (60 s in botocore). SO_LINGER 0 makes the final close an RST.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()

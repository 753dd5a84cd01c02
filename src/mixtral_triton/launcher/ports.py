"""The server's three ports, chosen free for tests so that two runs never collide."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from mixtral_triton.errors import UserError

@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def check_free(self, host: str = "127.0.0.1") -> None:
        """Fail with the port's name before the server starts, not in its log afterwards."""
        if len({self.http, self.grpc, self.metrics}) != 3:
            raise UserError(f"the http, grpc and metrics ports must differ, got {self.http}, {self.grpc}, {self.metrics}")
        named = (("http", self.http), ("grpc", self.grpc), ("metrics", self.metrics))
        for name, port in named:
            if not 1 <= port <= 65535:
                raise UserError(f"--{name}-port must be between 1 and 65535, got {port}")
        for name, port in named:
            problem = bind_error(port, host)
            if isinstance(problem, socket.gaierror) or getattr(problem, "errno", None) == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host} is not an address of this machine ({problem.strerror})")
            if problem is not None:
                raise UserError(f"--{name}-port {port} is already in use")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    return bind_error(port, host) is None


def bind_error(port: int, host: str = "127.0.0.1") -> OSError | None:
    """Why `host:port` cannot be listened on (in use, or no such address here), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def free_ports() -> Ports:
    """Three distinct ports the kernel reports free right now.

    Triton cannot be told to pick its own ports (0 is refused), so we ask the kernel: all
    three sockets are held open together so the kernel cannot hand out the same port twice.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        numbers = [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    return Ports(*numbers)

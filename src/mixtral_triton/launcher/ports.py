"""The server's three ports, chosen free for tests so that two runs never collide."""

from __future__ import annotations

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
        for name, port in (("http", self.http), ("grpc", self.grpc), ("metrics", self.metrics)):
            if not 1 <= port <= 65535:
                raise UserError(f"--{name}-port must be between 1 and 65535, got {port}")
            if not port_is_free(port, host):
                raise UserError(f"--{name}-port {port} is already in use")
        if len({self.http, self.grpc, self.metrics}) != 3:
            raise UserError(f"the http, grpc and metrics ports must differ, got {self.http}, {self.grpc}, {self.metrics}")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


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

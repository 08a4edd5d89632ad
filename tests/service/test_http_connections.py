"""HTTP connections of ``peer-service api`` as clients reuse them."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

from .conftest import free_port
from .test_processes import http, processes, service_env, start, wait_ready  # noqa: F401 - processes: a fixture

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"


def answer(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            return data  # the server closed the connection
        data += chunk
    return data


def test_an_idle_connection_outlives_the_clients_own_keep_alive(processes, tmp_path):
    """Found by the soak (benchmarks/soak.py): uvicorn closed idle connections after 5 s, the moment httpx clients
    (5 s keep-alive expiry) may reuse them; under load 15 of 23,000 requests failed with 'Server disconnected'.
    The service keeps them PEER_HTTP_KEEP_ALIVE_SECONDS (65 s), so the client is always the one to drop them."""
    port, env = free_port(), service_env(tmp_path)
    assert subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, capture_output=True).returncode == 0
    api = start(processes, ["api", "--port", str(port)], env, tmp_path / "api.log")
    with http(port) as client:
        wait_ready(client, api)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(REQUEST)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6.5)  # idle longer than uvicorn's default keep-alive and httpx's expiry
        sock.sendall(REQUEST)
        assert answer(sock).startswith(b"HTTP/1.1 200")

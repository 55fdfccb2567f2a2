"""Binding a server's port alone, and naming the process that holds it when that fails.

gRPC sets SO_REUSEPORT by default on Linux: a second server on the same port then binds without
error and the kernel splits connections between the two (two generations of one service answering
at random). Servers here bind with grpc.so_reuseport=0, so a second bind fails, and the error says
which port and, where this machine lets us see it, which process holds it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import grpc

SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


HINT = "choose another port (--port, FLUXLORA_PORT)"


def bind(server: grpc.Server, target: str, credentials: grpc.ServerCredentials | None, what: str) -> int:
    """Binds `target` ("host:port") on `server`; OSError naming the port and its likely holder."""
    try:
        port = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
    except RuntimeError:
        port = 0
    if port == 0:
        raise _in_use(target, what, HINT)
    return port


def check_free(host: str, port: int, what: str, hint: str = HINT) -> None:
    """OSError, worded as `bind`'s, when `port` cannot be bound now (checked before starting servers
    that would otherwise fail one by one, after their health checks reached whoever holds the port)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as err:
            raise _in_use(f"{host}:{port}", what, hint) from err


def _in_use(target: str, what: str, hint: str) -> OSError:
    number = target.rsplit(":", 1)[-1]
    holder = holder_of(int(number)) if number.isdigit() and int(number) else None
    by = f"; held by {holder}" if holder else "; another process holds it, or the address is not this machine's"
    return OSError(f"could not bind {target} for {what}: port {number} is in use{by}. Stop that process or {hint}")


def holder_of(port: int) -> str | None:
    """'pid N (command line)' of a process listening on TCP `port`, if one of ours is; else None."""
    try:
        import psutil
    except ImportError:
        return _holder_from_proc(port)
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return _describe(conn.pid)
    except (psutil.Error, OSError):
        return _holder_from_proc(port)
    return _holder_from_proc(port)


def _holder_from_proc(port: int) -> str | None:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the socket's inode
            if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                return _describe(int(pid))
        except OSError:
            continue
    return "a process of another user" if inodes else None


def _describe(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    return f"pid {pid} ({command[:120]})" if command else f"pid {pid}"

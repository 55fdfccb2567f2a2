"""What the faults act on: server processes started as an operator would (`python -m
fluxlora.server.cli serve <service>`), a TCP proxy in front of moto's S3 server that can reset,
slow down or answer NoSuchBucket, and a small size-limited file system for the local store."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fluxlora.server.local import free_port, wait_healthy

S3_KEY, S3_SECRET = "chaos", "chaos-secret"


# --- /proc -----------------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of a live process; None when it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[3])


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) and stat[0] == pid:
            found.append(int(entry))
    return found


def in_sessions(sessions: set[int]) -> list[int]:
    """Live processes whose session is one of `sessions` (a server and whatever it started)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) and stat[1] in sessions:
            found.append(int(entry))
    return found


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def listeners() -> dict[int, set[int]]:
    """port -> pids with a listening TCP socket on it (IPv4 and IPv6), from /proc/net and /proc/*/fd."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A":  # LISTEN
                inodes[parts[9]] = int(parts[1].rsplit(":", 1)[1], 16)
    ports: dict[int, set[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and (port := inodes.get(target[8:-1])) is not None:
                ports.setdefault(port, set()).add(int(entry))
    return ports


# --- servers ---------------------------------------------------------------------------------
class ServerProcess:
    """One service on a fixed port across its generations; each generation in its own session."""

    def __init__(self, service: str, env: dict[str, str], log_dir: Path, label: str = ""):
        self.service = service
        self.label = label or service  # "training-2" for a second replica
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = env
        self.log_dir = log_dir
        self.process: subprocess.Popen | None = None
        self.generations: list[subprocess.Popen] = []
        self.sessions: set[int] = set()
        self.failed_starts = 0
        self.expected_down = False  # set while a fault holds it down (an exit then is no crash)

    def spawn(self) -> subprocess.Popen:
        """A new generation (not waited for)."""
        with open(self.log_dir / f"{self.label}.log", "ab") as log:
            log.write(f"\n=== generation {len(self.generations) + 1} at {time.time():.1f}\n".encode())
            log.flush()
            process = subprocess.Popen(
                [sys.executable, "-m", "fluxlora.server.cli", "serve", self.service,
                 "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.generations.append(process)
        self.sessions.add(process.pid)
        self.process = process
        return process

    def start(self, timeout: float = 180.0, attempts: int = 20) -> None:
        """Starts a new generation and waits until it serves; a generation that exits before then is
        started again after a second, as a supervisor would (counted in failed_starts)."""
        for _ in range(attempts):
            process = self.spawn()
            try:
                wait_healthy(self.address, timeout, alive=lambda p=process: p.poll() is None)
                self.expected_down = False
                return
            except RuntimeError:
                self.failed_starts += 1
                time.sleep(1.0)
        raise RuntimeError(f"{self.label} did not start in {attempts} attempts; see {self.log_dir}")

    def rolling_restart(self, wait_s: float = 60.0) -> tuple[bool, str]:
        """A new generation on the same port while the old one still serves, then SIGTERM to the old one
        (blue/green on one host). Returns (old stopped in time, how the port was held meanwhile)."""
        old = self.process
        self.expected_down = True
        new = self.spawn()
        deadline = time.monotonic() + 120
        shared = ""
        while time.monotonic() < deadline and new.poll() is None:
            holders = listeners().get(self.port, set())
            if new.pid in holders:
                if old.pid in holders:
                    shared = f"port {self.port} held by old pid {old.pid} and new pid {new.pid} at once"
                break
            time.sleep(0.2)
        old.send_signal(signal.SIGTERM)
        try:
            old.wait(wait_s)
            stopped = True
        except subprocess.TimeoutExpired:
            old.kill()
            old.wait(30)
            stopped = False
        if new.poll() is not None:  # it could not have the port: start it again now that the old one is gone
            self.failed_starts += 1
            self.start()
        else:
            wait_healthy(self.address, 180, alive=lambda: new.poll() is None)
            self.expected_down = False
        return stopped, shared

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def sigkill(self) -> list[int]:
        """SIGKILL to the server process only (as the OOM killer picks one process); returns the
        children it leaves behind."""
        left = children(self.process.pid)
        self.expected_down = True
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        return left

    def sigterm(self, wait_s: float = 60.0) -> bool:
        """SIGTERM and wait for it to exit (SIGKILL after wait_s: False then)."""
        self.expected_down = True
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(wait_s)
            return True
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            return False

    def pids(self) -> list[int]:
        return in_sessions(self.sessions)


# --- S3 --------------------------------------------------------------------------------------
NO_SUCH_BUCKET = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchBucket</Code>'
                  b"<Message>The specified bucket does not exist</Message><RequestId>chaos</RequestId></Error>")


class S3Proxy:
    """moto's S3 server behind a TCP proxy whose mode the faults switch: "normal", "down" (every
    connection reset, live ones cut), "slow" (each chunk delayed by `latency`), "lost_bucket" (every
    request answered 404 NoSuchBucket, as when the bucket was deleted; the data is back afterwards, as
    when it is recreated from a replica). The servers reach S3 through the proxy; the checks go
    straight to moto."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per S3 request
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.direct = f"{host}:{port}"
        self.mode, self.latency = "normal", 0.0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._live: set[socket.socket] = set()
        self._lost: set[socket.socket] = set()  # connections answered NoSuchBucket
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="s3-proxy").start()

    def set(self, mode: str, latency: float = 0.0) -> None:
        self.mode, self.latency = mode, latency
        if mode in ("down", "lost_bucket"):
            with self._lock:
                live, self._live = list(self._live), set()
            for sock in live:
                _close(sock)
        if mode != "lost_bucket":
            # The bucket is back for every connection, as on S3: a keep-alive connection opened during the
            # fault would otherwise answer NoSuchBucket for good (the client's pool reuses it), and a
            # server would read its records as missing long after the fault (issue 12: GetJob NOT_FOUND
            # for every job of the last preprocessing generation at the final check).
            with self._lock:
                lost, self._lost = list(self._lost), set()
            for sock in lost:
                _close(sock)

    def close(self) -> None:
        self.listener.close()
        self.set("down")
        self.moto.stop()

    def _accept(self) -> None:
        while True:
            try:
                client = self.listener.accept()[0]
            except OSError:
                return
            if self.mode == "down":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # RST: connection reset by peer
                continue
            if self.mode == "lost_bucket":
                with self._lock:
                    self._lost.add(client)
                threading.Thread(target=self._no_such_bucket, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", int(self.direct.rsplit(":", 1)[1])))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._live |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self.mode == "slow":
                    time.sleep(self.latency)
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            _close(end)
            with self._lock:
                self._live.discard(end)

    def _no_such_bucket(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            while True:  # answer each request on this connection until the client closes it
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                header, _, body = head.partition(b"\r\n\r\n")
                length = 0
                for line in header.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip() or 0)
                while len(body) < length:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    body += chunk
                if self.mode != "lost_bucket":
                    return  # the fault ended while this request came: dropped, and retried on a new connection
                is_head = header.startswith(b"HEAD ")
                client.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\n"
                               b"Content-Length: %d\r\nx-amz-request-id: chaos\r\n\r\n" % len(NO_SUCH_BUCKET)
                               + (b"" if is_head else NO_SUCH_BUCKET))
        except OSError:
            pass
        finally:
            _close(client)
            with self._lock:
                self._lost.discard(client)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# --- a small disk ----------------------------------------------------------------------------
class SmallDisk:
    """The local store's file system: a tmpfs of `size_mib` (mounted by bench/chaos.py in a private
    mount namespace), filled with a ballast file for a disk_full fault."""

    def __init__(self, root: Path, size_mib: int):
        self.root = root
        self.size_mib = size_mib
        self.ballast = root / "ballast.bin"  # outside the store directory (root/store)

    @staticmethod
    def mount(root: Path, size_mib: int) -> str:
        """Mounts a tmpfs at root; '' on success, else why not."""
        root.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "chaos", str(root)],
                                capture_output=True, text=True)
        return "" if result.returncode == 0 else (result.stderr.strip() or f"mount exited {result.returncode}")

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def fill(self, leave_bytes: int = 16 * 1024) -> None:
        """Fills the file system but `leave_bytes` (less than one image or checkpoint)."""
        with open(self.ballast, "ab") as ballast:
            block = b"\0" * (1 << 20)
            while (free := self.free_bytes()) > leave_bytes:
                try:
                    ballast.write(block[: min(len(block), free - leave_bytes)] or b"\0")
                    ballast.flush()
                except OSError:
                    break

    def drain(self) -> None:
        self.ballast.unlink(missing_ok=True)

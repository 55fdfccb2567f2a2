"""Webhooks through an HTTP proxy named by the standard variables (HTTP_PROXY, HTTPS_PROXY, NO_PROXY),
with a small forwarding proxy in the test: events reach the receiver through it, signed; a host
NO_PROXY lists is reached directly; FLUXLORA_WEBHOOK_ALLOWED_HOSTS is about the receiver, not the proxy
(the proxy's own address is on no list), and a receiver's name rebound to the metadata address is
still refused behind the proxy, which then sees nothing."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import http.server
import ipaddress
import socket
import ssl
import threading
import urllib.parse

import pytest
from test_webhooks import Receiver, submitted, wait_job

from fluxlora.jobs import webhook_http
from fluxlora_api.v1 import jobs_pb2
from support import wait_until

S = jobs_pb2.JobState
RECEIVER_HOST = "127.0.0.2"  # another loopback address than the proxy's


class Proxy:
    """A forwarding HTTP proxy (absolute-URI requests, and CONNECT tunnels) that records what it forwarded."""

    def __init__(self):
        self.forwarded: list[tuple[str, str | None]] = []  # (the request's URL, its Proxy-Authorization)
        self.tunnels: list[tuple[str, str | None]] = []  # (host:port, its Proxy-Authorization)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_CONNECT(self):  # noqa: N802
                proxy.tunnels.append((self.path, self.headers.get("proxy-authorization")))
                host, port = self.path.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)), timeout=10)
                self.send_response(200)
                self.end_headers()
                self.wfile.flush()

                def pipe(source, sink):
                    with contextlib.suppress(OSError):
                        while data := source.recv(65536):
                            sink.sendall(data)
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)

                back = threading.Thread(target=pipe, args=(upstream, self.connection), daemon=True)
                back.start()
                pipe(self.connection, upstream)
                back.join(10)
                upstream.close()
                self.close_connection = True

            def do_POST(self):  # noqa: N802 - http.server's name
                proxy.forwarded.append((self.path, self.headers.get("proxy-authorization")))
                target = urllib.parse.urlsplit(self.path)
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k: v for k, v in self.headers.items() if k.lower() != "proxy-authorization"}
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                try:
                    upstream.request("POST", target.path + (f"?{target.query}" if target.query else ""), body, headers)
                    status = upstream.getresponse().status
                finally:
                    upstream.close()
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://hooks:s%3Acret@127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(monkeypatch):
    proxy = Proxy()
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)  # (uppercase: gRPC's own channels read lowercase names only)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    yield proxy
    proxy.close()


def test_events_go_through_the_proxy_the_environment_names_and_the_allowed_hosts_are_the_receivers(
        tmp_path, proxy):
    receiver = Receiver(host=RECEIVER_HOST)
    try:
        with submitted(tmp_path, [receiver.url], webhook_allowed_hosts=[RECEIVER_HOST]) as (server, job, _):
            assert wait_job(server, job.job_id).state == S.JOB_STATE_SUCCEEDED
            wait_until(server.webhooks.idle, "webhooks delivered", timeout=30.0)
    finally:
        receiver.close()
    events = receiver.events()  # each verified: signed, and untouched by the proxy
    assert [e.type for e in events][0] == "job.accepted" and events[-1].type == "job.succeeded"
    assert len(proxy.forwarded) == len(events)
    url = urllib.parse.urlsplit(receiver.url)
    assert {path for path, _ in proxy.forwarded} == {f"http://{url.netloc}{url.path}?{url.query}"}
    assert {auth for _, auth in proxy.forwarded} == {"Basic aG9va3M6czpjcmV0"}  # hooks:s:cret


def test_a_host_no_proxy_lists_is_reached_directly(tmp_path, proxy, monkeypatch):
    monkeypatch.setenv("NO_PROXY", f"example.com,{RECEIVER_HOST}")
    assert webhook_http.proxy_for(f"http://{RECEIVER_HOST}:1/hook") is None
    assert webhook_http.proxy_for("http://hooks.example.com/hook") is None
    assert webhook_http.proxy_for("http://127.0.0.3/hook") == proxy.url
    assert webhook_http.proxy_for("https://127.0.0.3/hook") == proxy.url
    monkeypatch.setenv("NO_PROXY", "*")
    assert webhook_http.proxy_for("https://127.0.0.3/hook") is None
    monkeypatch.setenv("NO_PROXY", RECEIVER_HOST)
    receiver = Receiver(host=RECEIVER_HOST)
    try:
        with submitted(tmp_path, [receiver.url]) as (server, job, _):
            assert wait_job(server, job.job_id).state == S.JOB_STATE_SUCCEEDED
            wait_until(server.webhooks.idle, "webhooks delivered", timeout=30.0)
    finally:
        receiver.close()
    assert receiver.events() and not proxy.forwarded


def test_a_name_rebound_to_the_metadata_address_is_refused_behind_the_proxy_too(tmp_path, proxy, monkeypatch):
    from fluxlora.jobs import webhook_targets

    resolve = webhook_targets.socket.getaddrinfo

    def rebound(host, *args, **kwargs):
        if kwargs.get("flags", 0) & webhook_targets.socket.AI_NUMERICHOST:
            return resolve(host, *args, **kwargs)
        return resolve("169.254.169.254" if host == "hooks.example.com" else host, *args, **kwargs)

    monkeypatch.setattr(webhook_targets.socket, "getaddrinfo", rebound)
    with submitted(tmp_path, ["http://hooks.example.com/hook"], webhook_allowed_hosts=["hooks.example.com"]) as (
            server, job, jobs):
        assert wait_job(server, job.job_id).state == S.JOB_STATE_SUCCEEDED
        wait_until(server.webhooks.idle, "webhooks given up", timeout=30.0)
        log = jobs.ListWebhookDeliveries(jobs_pb2.ListWebhookDeliveriesRequest(job_id=job.job_id), timeout=10)
    assert log.deliveries and all(d.status == "failed" and len(d.attempts) == 1 for d in log.deliveries)
    assert "169.254.169.254" in log.deliveries[0].attempts[0].error
    assert not proxy.forwarded


def test_https_events_go_through_a_connect_tunnel_with_tls_to_the_receiver(tmp_path, proxy, monkeypatch):
    cert, key = self_signed(tmp_path, RECEIVER_HOST)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the server trusts the receiver's certificate alone
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    receiver = Receiver(host=RECEIVER_HOST, tls=tls)
    try:
        with submitted(tmp_path, [receiver.url], webhook_allowed_hosts=[RECEIVER_HOST]) as (server, job, _):
            assert wait_job(server, job.job_id).state == S.JOB_STATE_SUCCEEDED
            wait_until(server.webhooks.idle, "webhooks delivered", timeout=30.0)
    finally:
        receiver.close()
    assert receiver.events()[-1].type == "job.succeeded"
    port = urllib.parse.urlsplit(receiver.url).port
    assert proxy.tunnels and {t for t, _ in proxy.tunnels} == {f"{RECEIVER_HOST}:{port}"} and not proxy.forwarded
    assert {auth for _, auth in proxy.tunnels} == {"Basic aG9va3M6czpjcmV0"}


def self_signed(folder, address: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "receiver.pem", folder / "receiver.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path

"""Where webhooks may go (fluxlora.jobs.webhook_targets): metadata and link-local addresses in any
spelling are refused, FLUXLORA_WEBHOOK_ALLOWED_HOSTS narrows the rest, and a name is checked again on
the addresses it resolves to at delivery (DNS rebinding), which are the ones connected to."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from fluxlora.common.config import Settings
from fluxlora.jobs import webhook_targets
from fluxlora.jobs.webhook_targets import Refused, WebhookTargets, connection
from fluxlora.jobs.webhooks import webhook_urls
from fluxlora_api.shared.errors import InvalidArgument

SECRET = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://2852039166/", "http://0xa9fea9fe/",
    "http://[::ffff:169.254.169.254]/", "http://[fd00:ec2::254]/", "http://[fe80::1]/",
    "http://metadata.google.internal/computeMetadata/v1/", "http://100.100.100.200/", "http://0.0.0.0:80/",
    "file:///etc/passwd", "gopher://127.0.0.1:6379/"])
def test_metadata_link_local_and_other_schemes_are_refused_by_default(url):
    with pytest.raises(Refused):
        WebhookTargets().check_url(url)


@pytest.mark.parametrize("url", ["https://hooks.example.com/x", "http://127.0.0.1:8080/hook", "http://10.1.2.3/"])
def test_anything_else_is_allowed_without_the_setting(url):
    WebhookTargets().check_url(url)


def test_the_allowed_hosts_setting_narrows_names_and_addresses():
    targets = WebhookTargets(["*.example.com", "hooks.other.org", "10.0.0.0/8"])
    for url in ("https://a.example.com/", "https://hooks.other.org/", "http://10.9.8.7/", "http://anything.net/"):
        targets.check_url(url)  # a name outside the patterns may still resolve into 10.0.0.0/8: told at delivery
    with pytest.raises(Refused, match="FLUXLORA_WEBHOOK_ALLOWED_HOSTS"):
        targets.check_url("http://192.168.1.1/")
    names_only = WebhookTargets(["*.example.com"])
    with pytest.raises(Refused, match="matches no entry"):
        names_only.check_url("https://example.org/")
    # an operator may allow a metadata-like range explicitly, by network only
    WebhookTargets(["169.254.0.0/16"]).check_url("http://169.254.10.10/")
    with pytest.raises(ValueError, match="FLUXLORA_WEBHOOK_ALLOWED_HOSTS"):
        WebhookTargets(["http://bad entry/"])


def test_a_name_is_checked_on_what_it_resolves_to_at_delivery(monkeypatch):
    answers = {"hooks.example.com": ["93.184.216.34"]}

    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(webhook_targets.socket, "getaddrinfo", getaddrinfo)
    targets = WebhookTargets(["hooks.example.com"])
    assert targets.resolve("hooks.example.com", 443) == ["93.184.216.34"]
    answers["hooks.example.com"] = ["93.184.216.34", "169.254.169.254"]  # rebound to the metadata service
    with pytest.raises(Refused, match="169.254.169.254"):
        targets.resolve("hooks.example.com", 443)
    answers["hooks.example.com"] = ["10.0.0.5"]  # a pattern-matched name may point inside, not at metadata
    assert targets.resolve("hooks.example.com", 443) == ["10.0.0.5"]
    answers["other.example.com"] = ["10.0.0.5"]
    with pytest.raises(Refused, match="no network"):
        targets.resolve("other.example.com", 443)
    assert WebhookTargets(["10.0.0.0/8"]).resolve("other.example.com", 80) == ["10.0.0.5"]


def test_the_connection_goes_to_the_checked_address_with_the_name_in_the_host_header():
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append(self.headers["host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_port
        # the name does not resolve at all: only the pinned address is ever connected to
        conn = connection(f"http://receiver.invalid:{port}/hook", ["127.0.0.1"], timeout=5)
        conn.request("POST", "/hook", body=b"{}")
        assert conn.getresponse().status == 204
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [f"receiver.invalid:{port}"]


def test_a_refused_url_at_submit_names_the_url_the_setting_and_the_fix():
    settings = Settings(webhook_secret=SECRET, webhook_allowed_hosts=["*.example.com"])
    with pytest.raises(InvalidArgument) as refused:
        webhook_urls(["http://169.254.169.254/latest/meta-data/?token=x"], settings)
    message = str(refused.value)
    assert "http://169.254.169.254/latest/meta-data/" in message and "token=x" not in message
    assert "FLUXLORA_WEBHOOK_ALLOWED_HOSTS" in message and "link-local" in message
    assert webhook_urls(["https://a.example.com/h"], settings) == ["https://a.example.com/h"]


def test_behind_a_proxy_a_name_this_server_cannot_resolve_passes_only_on_a_host_pattern():
    targets = WebhookTargets(["*.invalid", "10.0.0.0/8"])
    targets.check_behind_proxy("hooks.invalid", 443)  # matches a pattern: the proxy resolves it
    with pytest.raises(Refused, match="does not resolve"):
        WebhookTargets(["10.0.0.0/8"]).check_behind_proxy("hooks.invalid", 443)
    WebhookTargets([]).check_behind_proxy("hooks.invalid", 443)  # no list: any name
    with pytest.raises(Refused, match="metadata"):
        targets.check_behind_proxy("169.254.169.254", 80)

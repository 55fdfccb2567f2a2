"""Where webhooks may go (SSRF): FLUXLORA_WEBHOOK_ALLOWED_HOSTS and the addresses always refused.

A caller who can submit a job names URLs the server then POSTs to from inside its network; without a
limit that reaches cloud metadata endpoints (credentials) and internal services. So:

- only http and https;
- link-local and cloud-metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254, Alibaba's
  100.100.100.200, Azure's 168.63.129.16) and metadata host names are refused unless an allowed
  entry is a network that contains them (an operator's explicit choice);
- with FLUXLORA_WEBHOOK_ALLOWED_HOSTS set (a JSON list of host patterns such as "hooks.example.com"
  or "*.example.com" and of addresses or networks such as "10.1.2.3" or "10.0.0.0/8"), a URL's host
  must match a pattern or resolve into a network; unset, any other host is allowed.

The check runs at submit (INVALID_ARGUMENT naming the URL and the setting) and again at every
delivery on the addresses the name resolves to then, and the connection goes to the address that
passed (`connect`), so a name that is rebound to an internal address after the submit gets nowhere.
"""

from __future__ import annotations

import fnmatch
import http.client
import ipaddress
import socket
import urllib.parse
from collections.abc import Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SETTING = "FLUXLORA_WEBHOOK_ALLOWED_HOSTS"
REFUSED_NETWORKS: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32", "168.63.129.16/32",
    "0.0.0.0/8", "::/128"))
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.internal"})


class Refused(ValueError):
    """A webhook URL or address this server may not send to; the message says why."""


class WebhookTargets:
    def __init__(self, allowed: Sequence[str] = ()):
        self.allowed = [a.strip() for a in allowed if a.strip()]
        self.networks: list[Network] = []
        self.patterns: list[str] = []
        for entry in self.allowed:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not all(c.isalnum() or c in "-.*_" for c in entry):
                    raise ValueError(f"{SETTING}: {entry!r} is neither a host pattern (hooks.example.com, "
                                     "*.example.com) nor an address or network (10.0.0.0/8)") from None
                self.patterns.append(entry.lower().rstrip("."))

    def check_url(self, url: str) -> None:
        """Raises Refused unless `url` may receive webhooks, as far as can be told without DNS."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused("only http and https URLs with a host can receive webhooks")
        host = parts.hostname.lower().rstrip(".")
        address = numeric(host)
        if address is not None:
            self.check_address(address, named=False)
        elif host in METADATA_NAMES:
            raise Refused(f"{host} is a cloud metadata service")
        elif self.allowed and not self.name_allowed(host) and not self.networks:
            raise Refused(f"{host} matches no entry of {SETTING}")

    def name_allowed(self, host: str) -> bool:
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.patterns)

    def check_address(self, address: Address, named: bool) -> None:
        """named: the host name already matched a pattern, so only the always-refused ranges apply."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        listed = any(address in network for network in self.networks)
        if any(address in network for network in REFUSED_NETWORKS) and not listed:
            raise Refused(f"{address} is a link-local or cloud-metadata address")
        if self.allowed and not named and not listed:
            raise Refused(f"{address} is in no network of {SETTING}")

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of `host` that may be connected to; Refused when any is refused (a name that
        also points inside is not trusted)."""
        host = host.lower().rstrip(".")
        if host in METADATA_NAMES:
            raise Refused(f"{host} is a cloud metadata service")
        named = self.name_allowed(host)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # OSError: retried like no answer
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            self.check_address(ipaddress.ip_address(address.split("%", 1)[0]), named)
        return addresses

    def check_behind_proxy(self, host: str, port: int) -> None:
        """The check when a proxy connects (fluxlora.jobs.webhook_http): the name, then the addresses it
        resolves to here; a name this server cannot resolve (egress through the proxy alone) passes only
        on a host pattern of the allowed list, or with no list."""
        host = host.lower().rstrip(".")
        self.check_url(f"http://[{host}]/" if ":" in host else f"http://{host}/")
        try:
            self.resolve(host, port)
        except Refused:
            raise
        except OSError:
            if self.allowed and not self.name_allowed(host):
                raise Refused(f"{host} does not resolve on this server and matches no host pattern of "
                              f"{SETTING}") from None

    def describe(self) -> str:
        return f"{SETTING}={self.allowed!r}" if self.allowed else f"{SETTING} unset"


def numeric(host: str) -> Address | None:
    """The address a numeric host means, in any form the resolver accepts ("2852039166", "0xa9fea9fe")."""
    try:
        info = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None
    return ipaddress.ip_address(str(info[0][4][0]).split("%", 1)[0])


def connection(url: str, addresses: Sequence[str], timeout: float) -> http.client.HTTPConnection:
    """An HTTP(S) connection to the URL's host that connects only to `addresses` (checked ones):
    the Host header and TLS (SNI, certificate) still use the name. No redirects; proxies:
    fluxlora.jobs.webhook_http."""
    parts = urllib.parse.urlsplit(url)
    base = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection

    class Pinned(base):  # type: ignore[valid-type,misc]
        def connect(self) -> None:
            error: OSError = OSError("no address")
            for address in addresses:
                try:
                    self.sock = socket.create_connection((address, self.port), self.timeout)
                    break
                except OSError as exc:
                    error = exc
            else:
                raise error
            if isinstance(self, http.client.HTTPSConnection):
                self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)

    return Pinned(parts.hostname or "", parts.port, timeout=timeout)

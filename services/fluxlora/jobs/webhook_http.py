"""One webhook POST, directly or through the proxy the standard variables name, no redirects.

http.client (what this uses) reads no proxy variables by itself; a server whose egress goes through
a proxy needs them honoured, the way curl, requests and urllib read them: HTTPS_PROXY for https
URLs, HTTP_PROXY for http ones (lowercase names first), no proxy for a host NO_PROXY lists (comma
separated names, domain suffixes, `*`). Proxies are http:// URLs, with user:password for Basic auth.

The target check (fluxlora.jobs.webhook_targets, FLUXLORA_WEBHOOK_ALLOWED_HOSTS) is about the URL's host,
never the proxy's: directly, the connection goes to an address of the host that passed the check;
through a proxy, the proxy resolves and connects (https: a CONNECT tunnel, TLS end to end with the
receiver; http: the absolute URL), after this server checked the name and, where it can resolve the
name itself, its addresses (a name it cannot resolve must match a host pattern of the allowed list).
"""

from __future__ import annotations

import base64
import http.client
import urllib.parse
import urllib.request

from fluxlora.jobs.webhook_targets import Refused, WebhookTargets, connection


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url`, or None (none set, or NO_PROXY lists the host)."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme)
    # (urllib's NO_PROXY matching, as urllib.request.ProxyHandler uses it; not in the type stubs)
    if not proxy or urllib.request.proxy_bypass_environment(parts.netloc, proxies):  # type: ignore[attr-defined]
        return None
    return proxy


def post(url: str, body: bytes, headers: dict[str, str], targets: WebhookTargets, timeout_s: float) -> tuple[int, str]:
    """(status code, "") or (0, why no answer came); Refused when the URL's host now resolves where
    webhooks may not go."""
    parts = urllib.parse.urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxy = proxy_for(url)
        if proxy is None:
            conn = connection(url, targets.resolve(parts.hostname or "", port), timeout_s)
        else:
            targets.check_behind_proxy(parts.hostname or "", port)
            conn, path, proxy_headers = _through(proxy, parts, port, path, timeout_s)
            headers = {**headers, **proxy_headers}
        try:
            conn.request("POST", path, body=body, headers=headers)
            return conn.getresponse().status, ""
        finally:
            conn.close()
    except Refused:
        raise
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return 0, "timed out" if isinstance(exc, TimeoutError) or "timed out" in str(exc) else str(exc)[:200]


def _through(proxy: str, target: urllib.parse.SplitResult, port: int, path: str,
             timeout_s: float) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
    """A connection through `proxy` to `target`, the request path to use on it, and headers for the proxy."""
    via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if via.scheme != "http" or not via.hostname:
        raise ValueError(f"proxy {_shown(via)} is not supported: name an http:// proxy in HTTP(S)_PROXY")
    auth = {}
    if via.username is not None:
        user = f"{urllib.parse.unquote(via.username)}:{urllib.parse.unquote(via.password or '')}"
        auth["Proxy-Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
    if target.scheme == "https":  # a tunnel: the proxy sees the host and port, never the request
        tunnel = http.client.HTTPSConnection(via.hostname, via.port or 80, timeout=timeout_s)
        tunnel.set_tunnel(target.hostname or "", port, headers=auth)
        return tunnel, path, {}
    conn = http.client.HTTPConnection(via.hostname, via.port or 80, timeout=timeout_s)
    host = f"[{target.hostname}]" if ":" in (target.hostname or "") else target.hostname
    return conn, f"http://{host}:{port}{path}", auth


def _shown(via: urllib.parse.SplitResult) -> str:
    """The proxy for messages: never its password."""
    return f"{via.scheme}://{via.hostname or ''}{':' + str(via.port) if via.port else ''}"

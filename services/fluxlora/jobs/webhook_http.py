"""One webhook POST: to an address of the URL's host that passed the target check
(fluxlora.jobs.webhook_targets), no redirects."""

from __future__ import annotations

import http.client
import urllib.parse

from fluxlora.jobs.webhook_targets import Refused, WebhookTargets, connection


def post(url: str, body: bytes, headers: dict[str, str], targets: WebhookTargets, timeout_s: float) -> tuple[int, str]:
    """(status code, "") or (0, why no answer came); Refused when the URL's host now resolves where
    webhooks may not go."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = targets.resolve(parts.hostname or "", port)
        conn = connection(url, addresses, timeout_s)
        try:
            conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body=body,
                         headers=headers)
            return conn.getresponse().status, ""
        finally:
            conn.close()
    except Refused:
        raise
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return 0, "timed out" if isinstance(exc, TimeoutError) or "timed out" in str(exc) else str(exc)[:200]

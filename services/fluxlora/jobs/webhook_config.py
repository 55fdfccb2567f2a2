"""The webhook settings a job and the server use: the URLs a new job's events go to (checked at submit),
where webhooks may go (fluxlora.jobs.webhook_targets) and the signing secret."""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

from fluxlora.common.config import Settings
from fluxlora.jobs.webhook_log import safe_url
from fluxlora.jobs.webhook_targets import SETTING, Refused, WebhookTargets
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument

MAX_URLS = 5
MAX_URL_CHARS = 2048


def webhook_urls(requested: Sequence[str], settings: Settings | None) -> list[str]:
    """The URLs a new job's events go to: the request's and the server's, checked. INVALID_ARGUMENT
    names a bad URL; FAILED_PRECONDITION when the server has no secret to sign with."""
    urls = list(dict.fromkeys([*(u.strip() for u in requested), *(settings.webhook_urls if settings else ())]))
    if len(requested) > MAX_URLS:
        raise InvalidArgument(f"webhook_urls has {len(requested)} URLs, at most {MAX_URLS} are allowed")
    targets = targets_of(settings)
    for url in urls:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or len(url) > MAX_URL_CHARS:
            raise InvalidArgument(f"webhook_urls: {url[:100]!r} is not an http(s) URL of at most {MAX_URL_CHARS} "
                                  "characters")
        try:
            targets.check_url(url)
        except Refused as exc:
            raise InvalidArgument(
                f"webhook_urls: {safe_url(url)!r} is refused: {exc} ({targets.describe()}). Use a receiver this "
                f"server may reach, or have the operator add its host or network to {SETTING} (a JSON list "
                'such as ["hooks.example.com", "*.example.com", "10.0.0.0/8"])') from None
    if urls and not secret_of(settings):
        raise FailedPrecondition("this server has no webhook secret to sign events with: set "
                                 "FLUXLORA_WEBHOOK_SECRET (whsec_<base64>) on the server, or submit without "
                                 "webhook_urls")
    return urls


def targets_of(settings: Settings | None) -> WebhookTargets:
    return WebhookTargets(settings.webhook_allowed_hosts if settings else ())


def secret_of(settings: Settings | None) -> str:
    return settings.webhook_secret.get_secret_value() if settings else ""

"""Reading a server's Prometheus /metrics in tests."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:<port>/metrics: (name, sorted labels) -> value."""
    text = scrape_text(port)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def label_values(samples: Samples, prefix: str = "") -> dict[str, set[str]]:
    """label name -> every value it takes in the samples whose name starts with `prefix`."""
    values: dict[str, set[str]] = {}
    for name, labels in samples:
        if name.startswith(prefix):
            for key, value in labels:
                values.setdefault(key, set()).add(value)
    return values

"""Scrape a test agent's Prometheus endpoint and read samples from it."""

from __future__ import annotations

import json
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.integration.agentproc import AgentProcess


def metrics_port(agent: AgentProcess, timeout: float = 30) -> int:
    """The port the agent's metrics server bound (test agents ask for an ephemeral one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in agent.log().splitlines():
            if '"metrics serving"' in line:
                return int(json.loads(line)["port"])
        time.sleep(0.1)
    raise AssertionError(f"the agent logged no 'metrics serving' line:\n{agent.log()}")


def scrape(agent: AgentProcess) -> list[Sample]:
    """Every sample of one scrape of http://127.0.0.1:<port>/metrics, parsed by the Prometheus parser."""
    url = f"http://127.0.0.1:{metrics_port(agent)}/metrics"
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sample ``name`` whose labels include ``labels``; 0 when absent (a series not yet created)."""
    found = [s for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name}{labels} is ambiguous: {found}"
    return found[0].value if found else 0.0

"""The admin listener as tests read it: Prometheus samples, readiness, health."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.process import wait_for


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


def has_metric(text: str, name: str, **labels: str) -> bool:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return True
    return False


async def scrape(http: aiohttp.ClientSession, admin_url: str) -> str:
    async with http.get(admin_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return await resp.text()


async def readyz(http: aiohttp.ClientSession, admin_url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(admin_url + "/readyz") as resp:
        return resp.status, await resp.json()


async def wait_healthy(admin_url: str, within: float = 20.0) -> None:
    """Wait until ``admin_url``/healthz answers 200 (a worker is up)."""
    async with aiohttp.ClientSession() as http:
        async def healthy() -> bool:
            try:
                async with http.get(admin_url + "/healthz",
                                    timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await wait_for(healthy, within, interval=0.1, what=f"{admin_url}/healthz")

"""Optional features plugged into the request path: chat injection, tokens, sandbox routes.

Kept apart from ``app`` so the proxy core does not depend on them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.config import Config

if TYPE_CHECKING:
    from gateway.app import Extensions, Gateway


async def install_features(config: Config, gateway: Gateway) -> Extensions:
    from gateway.app import Extensions

    ext = Extensions()
    return ext

"""Shared values and helpers of the sandbox tests (a module, not a conftest: test files import
it by its full name, which cannot be confused with another folder's conftest)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from pydantic import SecretStr

from gateway.sandbox.authv2 import sign
from gateway.sandbox.settings import SandboxSettings

SECRET = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"
TENANT = "202007159031"
CHANNEL = "202011230001"
NEW_CLIENT_PATH = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"
CONTENT_TYPE = "application/json;charset=UTF-8"


def settings(**overrides: Any) -> SandboxSettings:
    base: dict[str, Any] = {"secret_key": SecretStr(SECRET)}
    base.update(overrides)
    return SandboxSettings(**base)


def iso(ts: float) -> str:
    moment = dt.datetime.fromtimestamp(ts, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def signed_body(name: str = "Tom", user_id: str = "10010001", *, now: float | None = None,
                secret: str = SECRET, path: str = NEW_CLIENT_PATH,
                access_key: str = CHANNEL) -> dict[str, Any]:
    """A thirdUserData as the gateway would post it in authorization mode."""
    import json

    body: dict[str, Any] = {"thirdUserName": name, "thirdUserId": user_id,
                            "tenantSpaceId": TENANT, "channelConfigId": CHANNEL}
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    body["thirdPartAuthorization"] = sign(
        secret_key=secret, access_key=access_key, timestamp=iso(time.time() if now is None
                                                                else now),
        method="POST", uri=path,
        headers={"Content-Length": str(len(payload.encode())), "Content-Type": CONTENT_TYPE},
        payload=payload)
    body.update({"locale": "en", "mapService": "tencent", "timestamp": 1})
    return body

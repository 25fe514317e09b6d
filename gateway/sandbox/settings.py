"""Settings of the CEC sandbox: the channel as the CEC's configuration pages describe it.

The model is embedded by the gateway's config as its ``sandbox:`` section and can also be loaded
from a YAML file of its own with :func:`load_sandbox_settings`. Every default makes the demo work
on a laptop: one demo agent, always open, no robot.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError, Problem
from gateway.yamlconf import (
    Duration,
    check_cec_secret,
    interpolate,
    problems_from,
    read_secret_files,
    read_yaml,
)

_CLOCK_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")
_OFFSET_RE = re.compile(r"^([+-])(\d{2}):(\d{2})$")
_SECRET_NAMES = frozenset({"secret_key", "password"})

DEFAULT_VALIDATE_URL = "http://127.0.0.1:8080/rest/cc-messaging/v1/thirdparty/chatThirdPartyValidate"




class _Model(BaseModel):
    # hide_input_in_errors: a validation message must never echo a secret or a password.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def clock_minutes(text: str) -> int:
    """``"09:30"`` -> 570; ``"24:00"`` -> 1440 (the end of the day)."""
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


class Period(_Model):
    """One working period of a day, ``start`` inclusive, ``end`` exclusive (``HH:MM``)."""

    start: str = "00:00"
    end: str = "24:00"

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, v: str) -> str:
        if not _CLOCK_RE.match(v):
            raise ValueError("write a time of day as HH:MM (00:00 to 24:00)")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> Period:
        if clock_minutes(self.start) >= clock_minutes(self.end):
            raise ValueError("a period must end after it starts (use 24:00 for midnight)")
        return self

    def contains(self, minute_of_day: int) -> bool:
        return clock_minutes(self.start) <= minute_of_day < clock_minutes(self.end)


class WorkingHours(_Model):
    """Agents' working time: up to 4 periods on workdays and up to 4 on other days."""

    timezone: str = "UTC"  # "UTC", an offset such as "+08:00", or an IANA name
    workdays: list[Annotated[int, Field(ge=1, le=7)]] = [1, 2, 3, 4, 5]  # ISO: Monday = 1
    workday_periods: list[Period] = Field(default_factory=lambda: [Period()], max_length=4)
    other_day_periods: list[Period] = Field(default_factory=lambda: [Period()], max_length=4)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        resolve_timezone(v)
        return v

    def tzinfo(self) -> dt.tzinfo:
        return resolve_timezone(self.timezone)

    def is_open(self, when: dt.datetime) -> bool:
        """Whether ``when`` (any aware datetime) falls inside a working period."""
        local = when.astimezone(self.tzinfo())
        periods = (self.workday_periods if local.isoweekday() in self.workdays
                   else self.other_day_periods)
        minute = local.hour * 60 + local.minute
        return any(p.contains(minute) for p in periods)


def resolve_timezone(name: str) -> dt.tzinfo:
    """``UTC``, ``+08:00`` style offsets (no tz database needed) or an IANA zone name."""
    if name.upper() == "UTC":
        return dt.UTC
    m = _OFFSET_RE.match(name)
    if m:
        sign = 1 if m.group(1) == "+" else -1
        return dt.timezone(sign * dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3))))
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            "unknown time zone; write UTC, an offset such as +08:00, or a name such as "
            "Asia/Shanghai"
        ) from None


class RobotSettings(_Model):
    """Robot first: a bot answers until the visitor types the hand-over keyword."""

    enabled: bool = False
    name: str = "Robot"
    greeting: str = "Hello, I am the service robot. Type 转人工 to talk to a human agent."
    default_reply: str = "Sorry, I did not understand that. Type 转人工 to talk to a human agent."
    handover_keyword: str = Field(default="转人工", min_length=1)
    handover_message: str = "Transferring you to a human agent..."


class AgentAccount(_Model):
    """An agent of the skill queue. The default one is a SANDBOX-ONLY demo account."""

    id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=64)
    password: SecretStr
    max_chats: int = Field(default=3, ge=1, le=50)


def _demo_agents() -> list[AgentAccount]:
    # A well-known password is acceptable only because the sandbox is a local stand-in.
    return [AgentAccount(id="agent1", name="Agent One", password=SecretStr("agent1"))]


class SandboxSettings(_Model):
    """The CEC stand-in: where it listens, the tenant and channel, and the channel settings."""

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    context_path: str = "/service-cloud"
    tenant_space_id: str = "202007159031"
    channel_config_id: str = "202011230001"
    access_key: str | None = None  # None -> channel_config_id, as the vendor recommends
    secret_key: SecretStr | None = None  # the caller fills it from CEC_SECRET_KEY
    validate_url: str | None = DEFAULT_VALIDATE_URL  # the enterprise's token validation
    validate_timeout: Duration = 5.0
    clock_skew: Duration = 300.0
    replay_window: Duration = 300.0
    # How the auth-v2 signature is computed (the SPEC's defaults; adjustable like the gateway's).
    signed_headers: list[str] = Field(
        default_factory=lambda: ["Content-Length", "Content-Type"], min_length=1)
    content_type: str = "application/json;charset=UTF-8"
    payload_fields: list[str] = Field(
        default_factory=lambda: ["thirdUserName", "thirdUserId", "tenantSpaceId",
                                 "channelConfigId"], min_length=1)
    visitor_ttl: Duration = 12 * 3600.0  # lifetime of a ccmessaging-token
    # ---- channel settings
    skill_queue: str = Field(default="default", min_length=1, max_length=20,
                             pattern=r"^\S+$")
    session_timeout: Duration = 1200.0  # idle time before a chat ends (20 min)
    session_end_message: str = "The chat has ended because nobody wrote for a while."
    # A visitor whose page is gone (tab closed, navigated away, no answer to the WebSocket
    # heartbeat) gets this long to come back (a reload, the site's next page) before the chat
    # ends: out of the queue, the agent's slot freed.
    visitor_heartbeat: Duration = Field(default=15.0, ge=0.1)
    visitor_gone_timeout: Duration = Field(default=30.0, ge=0)
    working_hours: WorkingHours | None = None  # None: always open
    off_hours_message: str = "Our agents are off duty now. Please come back during working hours."
    queue_reminder_interval: Duration = 10.0
    # Said while an agent is ready but has no free slot ...
    queue_reminder_text: str = (
        "All agents are busy. You are number {position} in the queue, please wait.")
    # ... and while no agent is ready at all (signed out or resting), so that a visitor is
    # never told "busy" while the console shows nobody serving.
    queue_no_agent_text: str = (
        "No agent is available right now. You are number {position} in the queue, "
        "please wait.")
    max_queue: int = Field(default=100, ge=1, le=10000)
    queue_full_message: str = "The queue is full. Please try again later."
    max_wait: Duration = Field(default=60.0, ge=1, le=60000)
    queue_timeout_message: str = "No agent became free in time. Please try again later."
    agent_joined_message: str = "{agent} is now serving you."
    robot: RobotSettings = Field(default_factory=RobotSettings)
    agents: list[AgentAccount] = Field(default_factory=_demo_agents)
    max_message_length: int = Field(default=2000, ge=1, le=100000)

    @field_validator("context_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or v.endswith("/") or "//" in v or len(v) < 2:
            raise ValueError("write a path such as /service-cloud (leading /, no trailing /)")
        return v

    @field_validator("secret_key")
    @classmethod
    def _secret_shape(cls, v: SecretStr | None) -> SecretStr | None:
        return check_cec_secret(v)

    @field_validator("agents")
    @classmethod
    def _unique_agents(cls, v: list[AgentAccount]) -> list[AgentAccount]:
        ids = [a.id for a in v]
        if len(ids) != len(set(ids)):
            raise ValueError("agent ids must be unique")
        return v

    @property
    def effective_access_key(self) -> str:
        return self.access_key or self.channel_config_id


# ---------------------------------------------------------------- loading


def load_sandbox_settings(path: str | Path, *,
                          env: Mapping[str, str] | None = None) -> SandboxSettings:
    """Read sandbox settings from YAML: a file of its own or a gateway.yaml's ``sandbox:``.

    ``${NAME}`` / ``${NAME:-default}`` are taken from ``env`` (default: the process
    environment), ``secret_key_file`` is read relative to the file, and when no secret is set
    at all ``CEC_SECRET_KEY`` from ``env`` is used.
    """
    env = os.environ if env is None else env
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem("", str(p), f"cannot read the file: {exc.strerror}",
                                   "pass an existing YAML file")]) from None
    tree = read_yaml(text, str(p))
    if isinstance(tree.get("sandbox"), dict):
        tree = tree["sandbox"]
    problems: list[Problem] = []
    tree = interpolate(tree, (), env, problems)
    tree = read_secret_files(tree, (), p.parent, problems)
    if problems:
        raise ConfigError(problems)
    if tree.get("secret_key") is None and env.get("CEC_SECRET_KEY"):
        tree["secret_key"] = env["CEC_SECRET_KEY"]
    try:
        return SandboxSettings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(problems_from(exc, tree)) from None

"""SandboxSettings: defaults that make the demo work, YAML loading, secrets never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.errors import ConfigError
from gateway.sandbox.settings import SandboxSettings, WorkingHours, load_sandbox_settings
from tests.support.sandbox import SECRET


def test_defaults() -> None:
    s = SandboxSettings()
    assert (s.host, s.port, s.context_path) == ("127.0.0.1", 8090, "/service-cloud")
    assert s.effective_access_key == s.channel_config_id == "202011230001"
    assert s.tenant_space_id == "202007159031"
    assert s.secret_key is None
    assert (s.clock_skew, s.replay_window) == (300.0, 300.0)
    assert s.session_timeout == 1200.0 and s.working_hours is None
    assert (s.queue_reminder_interval, s.max_queue, s.max_wait) == (10.0, 100, 60.0)
    assert s.robot.enabled is False and s.robot.handover_keyword == "转人工"
    assert [(a.id, a.password.get_secret_value()) for a in s.agents] == [("agent1", "agent1")]
    assert s.validate_url is not None and s.validate_url.endswith("chatThirdPartyValidate")


def test_access_key_override() -> None:
    assert SandboxSettings(access_key="ak").effective_access_key == "ak"


def test_durations_accept_units() -> None:
    s = SandboxSettings(session_timeout="20m", queue_reminder_interval="500ms", clock_skew=60)
    assert (s.session_timeout, s.queue_reminder_interval, s.clock_skew) == (1200.0, 0.5, 60.0)


@pytest.mark.parametrize("kw", [
    {"context_path": "service-cloud"}, {"context_path": "/service-cloud/"},
    {"max_queue": 0}, {"max_queue": 10001}, {"max_wait": 60001}, {"skill_queue": "a b"},
    {"skill_queue": "x" * 21}, {"session_timeout": "soon"}, {"port": 70000},
    {"agents": [{"id": "a", "name": "A", "password": "p"},
                {"id": "a", "name": "B", "password": "q"}]},
    {"unknown_key": 1},
])
def test_invalid(kw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SandboxSettings(**kw)


def test_bad_secret_is_not_echoed() -> None:
    leaked = "S3cr3t-with-dash-" + "x" * 26
    with pytest.raises(ValidationError) as err:
        SandboxSettings(secret_key=leaked)
    assert leaked not in str(err.value) and "43 characters" in str(err.value)
    assert SECRET not in repr(SandboxSettings(secret_key=SECRET))


def test_working_hours_validation() -> None:
    with pytest.raises(ValidationError):
        WorkingHours(workday_periods=[{"start": "10:00", "end": "09:00"}])
    with pytest.raises(ValidationError):
        WorkingHours(workday_periods=[{"start": "25:00", "end": "26:00"}])
    with pytest.raises(ValidationError):
        WorkingHours(workday_periods=[{}] * 5)
    with pytest.raises(ValidationError):
        WorkingHours(timezone="Mars/Olympus")
    assert WorkingHours(timezone="Asia/Shanghai").tzinfo() is not None


def test_load_own_file_with_env(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.yaml"
    path.write_text("port: ${SANDBOX_PORT:-9001}\nsecret_key: ${MY_SECRET}\n"
                    "robot:\n  enabled: true\nworking_hours:\n  timezone: '+08:00'\n"
                    "  workday_periods: [{start: '09:00', end: '18:00'}]\n", encoding="utf-8")
    s = load_sandbox_settings(path, env={"MY_SECRET": SECRET})
    assert s.port == 9001 and s.robot.enabled
    assert s.secret_key is not None and s.secret_key.get_secret_value() == SECRET
    assert s.working_hours is not None and s.working_hours.timezone == "+08:00"


def test_load_sandbox_section_and_cec_secret_env(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: {port: 8080}\nsandbox:\n  port: 8091\n  max_queue: 5\n",
                    encoding="utf-8")
    s = load_sandbox_settings(path, env={"CEC_SECRET_KEY": SECRET})
    assert (s.port, s.max_queue) == (8091, 5)
    assert s.secret_key is not None and s.secret_key.get_secret_value() == SECRET


def test_load_secret_file(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text(SECRET + "\n", encoding="utf-8")
    path = tmp_path / "sandbox.yaml"
    path.write_text("secret_key_file: secret.txt\n", encoding="utf-8")
    s = load_sandbox_settings(path, env={})
    assert s.secret_key is not None and s.secret_key.get_secret_value() == SECRET


def test_load_errors_name_the_key_but_not_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.yaml"
    path.write_text("secret_key: not-a-valid-secret-value\nmax_queue: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_sandbox_settings(path, env={})
    text = str(err.value)
    assert "not-a-valid-secret-value" not in text
    assert "secret_key" in text and "max_queue" in text


def test_load_missing_env_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.yaml"
    path.write_text("secret_key: ${NOPE}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="NOPE"):
        load_sandbox_settings(path, env={})
    path.write_text("port: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="YAML"):
        load_sandbox_settings(path, env={})
    with pytest.raises(ConfigError):
        load_sandbox_settings(tmp_path / "missing.yaml", env={})

"""fedmq.shared.settings: env beats TOML beats defaults; invalid values name their field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.shared.codec import DEFAULT_MAX_MESSAGE_BYTES
from fedmq.shared.errors import ConfigError
from fedmq.shared.settings import FedmqSettings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FEDMQ_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env from the developer's checkout


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fedmq.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = load_settings(FedmqSettings)
    assert s.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert s.amqp_url.startswith("amqp://")


def test_toml_file_is_read(tmp_path: Path) -> None:
    s = load_settings(FedmqSettings, _toml(tmp_path, 'amqp_url = "amqp://toml-host/"\nlog_level = "DEBUG"\n'))
    assert s.amqp_url == "amqp://toml-host/" and s.log_level == "DEBUG"


def test_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _toml(tmp_path, 'amqp_url = "amqp://toml-host/"\nlog_level = "DEBUG"\n')
    monkeypatch.setenv("FEDMQ_AMQP_URL", "amqps://env-host:5671/")
    s = load_settings(FedmqSettings, path)
    assert s.amqp_url == "amqps://env-host:5671/"
    assert s.log_level == "DEBUG"  # fields the env does not set still come from the file


def test_dotenv_between_env_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _toml(tmp_path, 'amqp_url = "amqp://toml-host/"\n')
    (tmp_path / ".env").write_text("FEDMQ_AMQP_URL=amqp://dotenv-host/\n")
    assert load_settings(FedmqSettings, path).amqp_url == "amqp://dotenv-host/"
    monkeypatch.setenv("FEDMQ_AMQP_URL", "amqp://env-host/")
    assert load_settings(FedmqSettings, path).amqp_url == "amqp://env-host/"


def test_explicit_arguments_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_AMQP_URL", "amqp://env-host/")
    s = load_settings(FedmqSettings, _toml(tmp_path, 'amqp_url = "amqp://toml/"\n'), amqp_url="amqp://arg/", log_level=None)
    assert s.amqp_url == "amqp://arg/" and s.log_level == "INFO"  # None means "not given"


def test_toml_does_not_leak_into_the_next_load(tmp_path: Path) -> None:
    load_settings(FedmqSettings, _toml(tmp_path, 'amqp_url = "amqp://toml-host/"\n'))
    assert load_settings(FedmqSettings).amqp_url != "amqp://toml-host/"


@pytest.mark.parametrize(
    ("source", "field", "value"),
    [
        ("env", "max_message_bytes", "abc"),
        ("env", "max_message_bytes", "1024"),
        ("env", "log_level", "LOUD"),
        ("env", "reconnect_initial_s", "-1"),
        ("env", "log_json", "perhaps"),
        ("toml", "max_message_bytes", "10"),
        ("toml", "max_message_bytes", '"big"'),
        ("toml", "log_level", '"LOUD"'),
        ("toml", "reconnect_max_s", "0"),
        ("toml", "amqp_url", "5"),
        ("toml", "no_such_field", "1"),
        ("arg", "max_message_bytes", 1 << 40),
    ],
)
def test_invalid_value_names_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, field: str, value: object
) -> None:
    path = None
    overrides: dict = {}
    if source == "env":
        monkeypatch.setenv(f"FEDMQ_{field.upper()}", str(value))
    elif source == "toml":
        path = _toml(tmp_path, f"{field} = {value}\n")
    else:
        overrides[field] = value
    with pytest.raises(ConfigError) as info:
        load_settings(FedmqSettings, path, **overrides)
    assert field in str(info.value)


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(FedmqSettings, tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="TOML"):
        load_settings(FedmqSettings, _toml(tmp_path, "amqp_url = \n"))


def test_subclass_adds_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class ServiceSettings(FedmqSettings):
        buffer_size: int = 4

    monkeypatch.setenv("FEDMQ_BUFFER_SIZE", "9")
    s = load_settings(ServiceSettings, _toml(tmp_path, 'amqp_url = "amqp://t/"\nbuffer_size = 2\n'))
    assert s.buffer_size == 9 and s.amqp_url == "amqp://t/"

"""Settings base shared by every service: ``FEDMQ_*`` env vars, ``.env``, and a TOML file.

Priority (highest first): explicit arguments, environment, ``.env``, the ``--config`` TOML
file, defaults. Each service builds one settings object at start-up and passes it down;
nothing reads the environment at import time.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from fedmq.shared.codec import DEFAULT_MAX_MESSAGE_BYTES
from fedmq.shared.errors import ConfigError

S = TypeVar("S", bound="FedmqSettings")


class FedmqSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDMQ_", env_file=".env", extra="forbid", env_nested_delimiter="__")

    #: broker URL(s) with this party's user and password (the user is the site id for a site); several cluster nodes separated by commas. Keep it in the environment (.env), not in TOML
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    #: largest chunk this party makes or accepts; capped at the codec's default so that the
    #: broker's max_message_size (fedmq.broker.topology.BROKER_MAX_MESSAGE_SIZE, 2x) always admits it
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=64 * 1024, le=DEFAULT_MAX_MESSAGE_BYTES)
    #: fedmq's own log level; pika/Opacus stay quiet unless DEBUG
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: one JSON object per log line (for a SIEM); false: plain text
    log_json: bool = True
    #: reconnect backoff: capped exponential with full jitter, reset after a healthy minute
    reconnect_initial_s: float = Field(0.5, gt=0)
    #: longest wait between reconnect attempts
    reconnect_max_s: float = Field(30.0, gt=0)

    #: TLS for ``amqps://`` URLs: the CA that signed the broker's certificate, and this
    #: party's client certificate and key (the broker can require them: verify_peer)
    tls_ca: Path | None = None
    #: this party's client certificate (PEM)
    tls_cert: Path | None = None
    #: this party's client key (PEM)
    tls_key: Path | None = None
    #: name checked against the broker's certificate; the URL's host when unset
    tls_server_name: str | None = None

    _toml_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        toml = getattr(cls, "_active_toml", None)
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        sources.append(file_secret_settings)
        return tuple(sources)


def load_settings(cls: type[S], config_file: str | Path | None = None, **overrides: Any) -> S:
    """Build settings, turning validation errors into one readable ``ConfigError``."""
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"config file {config_file} not found")
    cls._active_toml = Path(config_file) if config_file else None  # type: ignore[attr-defined]
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"invalid {cls.__name__}:\n" + "\n".join(lines)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
    finally:
        cls._active_toml = None  # type: ignore[attr-defined]

"""Settings read from the environment (prefix ``SLIPWAY_``) and an optional ``.env`` file."""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from slipway.errors import ConfigError
from slipway.secrets import VaultResolvingSettings


class Settings(VaultResolvingSettings):
    """Where slipway keeps its state. Everything defaults to an embedded setup under ``SLIPWAY_HOME``.

    Any value may hold a ``vault://MOUNT/PATH#KEY`` reference, whole or embedded as ``${vault://...}`` (e.g. the
    password in ``SLIPWAY_DATABASE_URL``); it is resolved through Vault (``SLIPWAY_VAULT_*``) when read."""

    model_config = SettingsConfigDict(env_prefix="SLIPWAY_", env_file=".env", extra="ignore")

    home: Path = Field(
        default=Path(".slipway"),
        description="Directory for embedded state (SQLite registry, local artifacts). Default ./.slipway.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the registry. Default: SQLite file registry.db in home.",
    )
    artifact_root: str | None = Field(
        default=None,
        description="Root URI for artifacts, file:// or s3://. Default: file:// URI of home/artifacts.",
    )
    actor: str | None = Field(
        default=None,
        description="Who is acting, recorded in the audit log. Default: the operating-system user.",
    )

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        """The registry URL, defaulting to a SQLite file inside ``home``."""
        return self.database_url or f"sqlite:///{self.home / 'registry.db'}"

    @property
    def resolved_artifact_root(self) -> str:
        """The artifact root URI, defaulting to ``file://HOME/artifacts``."""
        if self.artifact_root:
            if "://" not in self.artifact_root:
                return (Path(self.artifact_root).expanduser().resolve()).as_uri()
            return self.artifact_root.rstrip("/")
        return (self.home / "artifacts").as_uri()

    @property
    def resolved_actor(self) -> str:
        if self.actor:
            return self.actor
        import getpass

        try:
            return getpass.getuser()
        except Exception:  # no passwd entry in some containers
            return "unknown"


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once. Raises :class:`ConfigError` on malformed values."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"SLIPWAY_{field.upper()}: {first['msg']}") from e

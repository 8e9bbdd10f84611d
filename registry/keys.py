"""API keys: created with a secret shown once, stored only as a hash, verified, listed, revoked."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from slipway.registry import audit
from slipway.registry.catalog import NAME_RE
from slipway.registry.errors import AlreadyExists, InvalidArgument, NotFound, RegistryError
from slipway.registry.models import ApiKey
from slipway.registry.types import utcnow

SECRET_PREFIX = "sk-slw-"
PREFIX_LEN = len(SECRET_PREFIX) + 6


class KeyRejected(RegistryError):
    """A presented secret is not a usable key; ``reason`` is invalid, revoked or expired."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def hash_secret(secret: str) -> str:
    """SHA-256 of the secret. Secrets carry 256 random bits, so a fast unsalted hash cannot be brute-forced."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    s: Session,
    *,
    name: str,
    team: str | None = None,
    models: Sequence[str] = (),
    rpm: int | None = None,
    tpm: int | None = None,
    expires_at: dt.datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the secret, which is never stored and cannot be shown again.

    Raises :class:`InvalidArgument` for a bad name or limit, :class:`AlreadyExists` for a taken name.
    """
    if not NAME_RE.match(name):
        raise InvalidArgument(f"invalid key name {name!r}: use lowercase letters, digits, '.', '_' or '-'")
    for label, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 1:
            raise InvalidArgument(f"{label} must be at least 1, got {value}")
    if expires_at is not None and expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=dt.UTC)
    audit.lock_chain(s)
    if s.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
        raise AlreadyExists(f"an API key named {name!r} already exists")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        name=name,
        prefix=secret[:PREFIX_LEN],
        key_hash=hash_secret(secret),
        team=team,
        models=sorted(set(models)),
        rpm=rpm,
        tpm=tpm,
        expires_at=expires_at,
        created_by=s.info.get("actor", "unknown"),
    )
    s.add(key)
    s.flush()
    audit.append(s, action="apikey.create", target=f"apikey:{name}", after=key_view(key))
    return key, secret


def verify_key(s: Session, secret: str, *, now: dt.datetime | None = None) -> ApiKey:
    """The key whose secret this is; :class:`KeyRejected` when unknown, revoked or expired."""
    key = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret)))
    if key is None:
        raise KeyRejected("invalid API key", "invalid")
    now = now or utcnow()
    if key.revoked_at is not None:
        raise KeyRejected(f"API key {key.prefix}… was revoked", "revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise KeyRejected(f"API key {key.prefix}… expired at {key.expires_at.isoformat()}", "expired")
    return key


def list_keys(s: Session, *, include_revoked: bool = False) -> list[ApiKey]:
    q = select(ApiKey).order_by(ApiKey.name)
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    return list(s.scalars(q))


def get_key(s: Session, name: str) -> ApiKey:
    key = s.scalar(select(ApiKey).where(ApiKey.name == name))
    if key is None:
        raise NotFound(f"no API key named {name!r}")
    return key


def revoke_key(s: Session, name: str) -> ApiKey:
    """Revoke by name (idempotent: revoking a revoked key changes nothing). Raises :class:`NotFound`."""
    audit.lock_chain(s)
    key = get_key(s, name)
    if key.revoked_at is None:
        before = key_view(key)
        key.revoked_at = utcnow()
        s.flush()
        audit.append(s, action="apikey.revoke", target=f"apikey:{name}", before=before, after=key_view(key))
    return key


def key_view(k: ApiKey) -> dict[str, object]:
    """What may be shown about a key: never its hash."""
    return {
        "name": k.name,
        "prefix": k.prefix,
        "team": k.team,
        "models": list(k.models or []),
        "rpm": k.rpm,
        "tpm": k.tpm,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
        "created_by": k.created_by,
        "created_at": k.created_at,
    }

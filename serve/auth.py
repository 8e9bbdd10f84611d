"""Who is calling: an API key from the registry (cached briefly) or a JWT bearer token with model scopes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from slipway.serve.errors import Forbidden, Unauthorized


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``models`` empty means every model; ``key_id`` and ``key_name`` are None for JWT
    callers; ``team`` (the key's team, or a JWT's ``team`` claim) is what team budgets count against."""

    subject: str
    key_id: int | None = None
    key_name: str | None = None
    team: str | None = None
    models: frozenset[str] = field(default_factory=frozenset)
    rpm: int | None = None
    tpm: int | None = None

    def check_model(self, model: str) -> None:
        if self.models and model not in self.models:
            raise Forbidden(f"this key may not use model {model!r}", param="model")


@dataclass(frozen=True)
class JwtConfig:
    """HS256 with a shared ``secret`` or RS256 with a PEM ``public_key``; optional audience and issuer."""

    algorithm: str = "HS256"
    secret: str | None = None
    public_key: str | None = None
    audience: str | None = None
    issuer: str | None = None


class Authenticator:
    """Resolves ``Authorization: Bearer ...``. Registry lookups run off the event loop and are cached
    for ``cache_ttl_s`` (a revocation takes effect within that time)."""

    def __init__(self, database_url: str | None, *, jwt: JwtConfig | None = None, cache_ttl_s: float = 5.0) -> None:
        self.database_url = database_url
        self.jwt = jwt
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, Principal | Unauthorized]] = {}
        self._registry: Any = None

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        token = authorization[7:].strip()
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now:
            result = hit[1]
        else:
            try:
                result = self._jwt(token) if token.count(".") == 2 else await asyncio.to_thread(self._lookup, token)
            except Unauthorized as e:
                result = e
            self._cache[token] = (now + self.cache_ttl_s, result)
            if len(self._cache) > 10000:
                self._cache.clear()
        if isinstance(result, Unauthorized):
            raise result
        return result

    def _lookup(self, secret: str) -> Principal:
        from slipway.registry import Registry
        from slipway.registry.keys import KeyRejected, verify_key

        if self.database_url is None:
            raise Unauthorized("API keys are not configured on this gateway")
        if self._registry is None:
            self._registry = Registry(self.database_url, actor="gateway")
        try:
            with self._registry.session() as s:
                k = verify_key(s, secret)
                return Principal(
                    subject=f"key:{k.name}",
                    key_id=k.id,
                    key_name=k.name,
                    team=k.team,
                    models=frozenset(k.models or ()),
                    rpm=k.rpm,
                    tpm=k.tpm,
                )
        except KeyRejected as e:
            code = {"revoked": "api_key_revoked", "expired": "api_key_expired"}.get(e.reason, "invalid_api_key")
            raise Unauthorized(str(e), code=code) from None

    def _jwt(self, token: str) -> Principal:
        import jwt as pyjwt

        cfg = self.jwt
        if cfg is None:
            raise Unauthorized("JWT bearer tokens are not accepted by this gateway")
        key = cfg.secret if cfg.algorithm.startswith("HS") else cfg.public_key
        try:
            claims = pyjwt.decode(
                token,
                key,
                algorithms=[cfg.algorithm],
                audience=cfg.audience,
                issuer=cfg.issuer,
                options={"require": ["exp", "sub"]},
            )
        except pyjwt.ExpiredSignatureError:
            raise Unauthorized("token expired", code="token_expired") from None
        except pyjwt.PyJWTError as e:
            raise Unauthorized(f"invalid token: {e}", code="invalid_token") from None
        models = claims.get("models") or claims.get("scope", "")
        if isinstance(models, str):
            models = [m.removeprefix("model:") for m in models.split() if m]
        team = claims.get("team")
        return Principal(
            subject=f"jwt:{claims['sub']}",
            team=str(team) if team else None,
            models=frozenset(models),
            rpm=claims.get("rpm"),
            tpm=claims.get("tpm"),
        )

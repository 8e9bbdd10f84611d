"""Who is calling: an API key from the registry (cached briefly) or a JWT bearer token with model scopes — from an
OpenID Connect issuer (SSO, :mod:`~slipway.serve.oidc`: discovery, JWKS, ``kid`` rotation) or signed with a
configured shared secret or public key. A JWT that grants no model is refused (403): deny by default.

A key's lookup is trusted for ``cache_ttl_s``. When the registry cannot be reached, a key looked up before keeps
its last answer for ``stale_if_error_s`` more (stale-if-error, as HTTP caches do), so a database outage does not
take serving down with it; a key never seen before gets 503 ``registry_unavailable`` (never 401: the key may be
good). Revocation trade-off: a key revoked while this replica cannot reach the registry keeps working until the
registry answers again or the stale bound passes, and never past the key's own expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from slipway.serve.errors import Forbidden, Overloaded, ServeError, Unauthorized
from slipway.serve.oidc import OidcConfig, OidcVerifier

log = logging.getLogger(__name__)
#: Lookups of keys held (good ones) and refused ones: refused ones are a separate, smaller cache so that a flood of
#: made-up keys cannot push the good ones out (they are what an outage falls back on).
_MAX_KEYS, _MAX_REFUSED = 100_000, 10_000


class RegistryUnavailable(Overloaded):
    """The registry cannot be reached and this key has no earlier lookup to fall back on (503)."""

    code = "registry_unavailable"


@dataclass
class _Entry:
    result: Principal | ServeError  # a refusal: Unauthorized (401) or Forbidden (403)
    fresh_until: float  # monotonic: looked up again after this
    stale_until: float  # monotonic: served while the registry is unreachable until this
    expires_at: float | None = None  # wall clock: the key's (or token's) own expiry, which no cache outlives


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``models`` empty means every model (a key created without models, or a token whose
    issuer says so explicitly); ``key_id`` and ``key_name`` are None for JWT callers; ``team`` (the key's team, or
    a JWT's team claim) is what team budgets count against."""

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
    """HS256 with a shared ``secret`` or RS256 with a PEM ``public_key``; optional audience and issuer. For SSO
    with an identity provider use :class:`~slipway.serve.oidc.OidcConfig` instead (keys fetched and rotated)."""

    algorithm: str = "HS256"
    secret: str | None = None
    public_key: str | None = None
    audience: str | None = None
    issuer: str | None = None


class Authenticator:
    """Resolves ``Authorization: Bearer ...``. Registry lookups run off the event loop, one at a time per key,
    and are cached for ``cache_ttl_s`` (a revocation takes effect within that time); see the module docstring
    for what happens while the registry is unreachable. After a failed lookup the registry is not asked again
    for ``retry_s``: meanwhile every request is answered from the cache at once."""

    def __init__(
        self,
        database_url: str | None,
        *,
        jwt: JwtConfig | None = None,
        oidc: OidcConfig | OidcVerifier | None = None,
        cache_ttl_s: float = 5.0,
        stale_if_error_s: float = 900.0,
        retry_s: float = 1.0,
        connect_timeout_s: int = 2,
    ) -> None:
        self.database_url = database_url
        self.jwt = jwt
        self.oidc = OidcVerifier(oidc) if isinstance(oidc, OidcConfig) else oidc
        self.cache_ttl_s, self.stale_if_error_s, self.retry_s = cache_ttl_s, stale_if_error_s, retry_s
        self.connect_timeout_s = connect_timeout_s
        self._keys: dict[str, _Entry] = {}
        self._refused: dict[str, _Entry] = {}
        self._lookups: dict[str, asyncio.Task[_Entry]] = {}
        self._down_until = 0.0  # monotonic: the registry failed; do not ask it before this
        self._registry: Any = None

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller. Raises :class:`Unauthorized` (401) for a missing, unknown, revoked or expired key or a bad
        token, :class:`Forbidden` (403) for a good token that grants no model, and :class:`RegistryUnavailable` /
        :class:`~slipway.serve.oidc.IssuerUnavailable` (503) for a key or token this replica cannot check now."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        token = authorization[7:].strip()
        now = time.monotonic()
        entry = self._keys.get(token) or self._refused.get(token)
        if entry is None or entry.fresh_until <= now:
            entry = await self._refresh(token, entry, now)
        result = entry.result
        if isinstance(result, Principal) and entry.expires_at is not None and entry.expires_at <= time.time():
            if result.key_name is None:
                result = Unauthorized("token expired", code="token_expired")
            else:
                result = Unauthorized(f"API key {result.key_name} expired", code="api_key_expired")
        if isinstance(result, ServeError):
            raise result
        return result

    async def _refresh(self, token: str, entry: _Entry | None, now: float) -> _Entry:
        if token.count(".") == 2:  # a JWT: checked here, no registry involved
            result: Principal | ServeError
            expires_at: float | None = None
            try:
                if self.oidc is not None and not (self.jwt is not None and _alg(token).startswith("HS")):
                    # off the event loop: an unknown kid fetches the issuer's JWKS
                    result, expires_at = await asyncio.to_thread(self._oidc_principal, token)
                else:
                    result, expires_at = self._jwt(token)
            except (Unauthorized, Forbidden) as e:  # 503s are not cached: the next request asks again
                result = e
            entry = _Entry(result, now + self.cache_ttl_s, now + self.cache_ttl_s, expires_at)
            return self._store(token, entry)
        if now < self._down_until:
            return self._stale(entry, now)
        task = self._lookups.get(token)
        if task is None:  # one lookup per key at a time, shared by concurrent requests and outliving any of them
            task = self._lookups[token] = asyncio.get_running_loop().create_task(self._lookup_entry(token, entry, now))
            task.add_done_callback(lambda t: (self._lookups.pop(token, None), t.cancelled() or t.exception()))
        return await asyncio.shield(task)

    async def _lookup_entry(self, token: str, entry: _Entry | None, now: float) -> _Entry:
        try:
            principal, expires_at = await asyncio.to_thread(self._lookup, token)
        except Unauthorized as e:
            return self._store(token, _Entry(e, now + self.cache_ttl_s, now + self.stale_if_error_s))
        except Exception as e:  # the registry is unreachable or failing: the cache answers
            if time.monotonic() >= self._down_until:
                log.warning("registry unreachable for key lookups (retrying every %.1fs): %s", self.retry_s, e)
            self._down_until = time.monotonic() + self.retry_s
            return self._stale(entry, now)
        if self._down_until:
            log.warning("registry reachable again for key lookups")
            self._down_until = 0.0
        return self._store(token, _Entry(principal, now + self.cache_ttl_s, now + self.stale_if_error_s, expires_at))

    def _stale(self, entry: _Entry | None, now: float) -> _Entry:
        """The last good answer while the registry is down, or 503 when there is none (or it is too old)."""
        if entry is not None and entry.stale_until > now:
            return entry
        raise RegistryUnavailable(
            "the API key registry is unreachable and this key was not seen recently; retry shortly",
            headers={"retry-after": str(max(1, round(self.retry_s)))},
        )

    def _store(self, token: str, entry: _Entry) -> _Entry:
        good = isinstance(entry.result, Principal)
        cache, other = (self._keys, self._refused) if good else (self._refused, self._keys)
        other.pop(token, None)
        cache.pop(token, None)  # re-inserted last: the dict's order is the order of last lookup
        cache[token] = entry
        if len(cache) > (_MAX_KEYS if good else _MAX_REFUSED):
            if good:
                del cache[next(iter(cache))]  # the key looked up longest ago
            else:
                cache.clear()
        return entry

    def _registry_of(self) -> Any:
        from slipway.registry import Registry, db

        if self._registry is None:
            url = self.database_url
            assert url is not None
            args = {"connect_args": {"connect_timeout": self.connect_timeout_s}} if url.startswith("postgres") else {}
            self._registry = Registry(engine=db.create_registry_engine(url, **args), actor="gateway")
        return self._registry

    def _lookup(self, secret: str) -> tuple[Principal, float | None]:
        """The key's principal and expiry (epoch seconds, or None); :class:`Unauthorized` when refused."""
        from slipway.registry.keys import KeyRejected, verify_key

        if self.database_url is None:
            raise Unauthorized("API keys are not configured on this gateway")
        try:
            with self._registry_of().session() as s:
                k = verify_key(s, secret)
                principal = Principal(
                    subject=f"key:{k.name}",
                    key_id=k.id,
                    key_name=k.name,
                    team=k.team,
                    models=frozenset(k.models or ()),
                    rpm=k.rpm,
                    tpm=k.tpm,
                )
                return principal, k.expires_at.timestamp() if k.expires_at is not None else None
        except KeyRejected as e:
            code = {"revoked": "api_key_revoked", "expired": "api_key_expired"}.get(e.reason, "invalid_api_key")
            raise Unauthorized(str(e), code=code) from None

    def _oidc_principal(self, token: str) -> tuple[Principal, float]:
        assert self.oidc is not None
        claims = self.oidc.verify(token)
        subject, team, models, tier = self.oidc.grants(claims)
        principal = Principal(subject=subject, team=team, models=models, rpm=tier.rpm, tpm=tier.tpm)
        return principal, float(claims["exp"])

    def _jwt(self, token: str) -> tuple[Principal, float]:
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
        if not models:  # an empty scope used to mean every model: deny by default instead
            raise Forbidden(
                "this token grants no model: it needs a 'models' claim or a 'model:NAME' scope",
                code="no_models_granted",
            )
        team = claims.get("team")
        principal = Principal(
            subject=f"jwt:{claims['sub']}",
            team=str(team) if team else None,
            models=frozenset(models),
            rpm=claims.get("rpm"),
            tpm=claims.get("tpm"),
        )
        return principal, float(claims["exp"])


def _alg(token: str) -> str:
    import jwt as pyjwt

    try:
        return str(pyjwt.get_unverified_header(token).get("alg") or "")
    except pyjwt.PyJWTError:
        return ""

"""Single sign-on for the gateway: JWTs from an OpenID Connect issuer (Okta, Auth0, Azure AD, Keycloak, Vault /
OpenBao identity tokens), verified against the issuer's discovery document and JWKS, their claims mapped to a
:class:`~slipway.serve.auth.Principal` by configuration.

What is checked, in this order: the header's ``alg`` is one of the configured asymmetric algorithms (``none`` and
the HMAC family never are: a public key must not double as a shared secret); its ``kid`` names a key of the
issuer's JWKS; the signature; ``iss`` equals the configured issuer (and the discovery document's own); ``aud``
contains the configured audience; ``exp``, ``iat`` and (when present) ``nbf`` with ``leeway_s``.

The JWKS is cached for ``jwks_ttl_s``; an unknown ``kid`` fetches it again at once (a key rotated in at the issuer
is accepted without a restart), at most every ``jwks_min_refresh_s`` so that tokens with made-up ``kid`` values
cannot make the gateway hammer the issuer. A key the issuer withdrew stops verifying when the cache next refreshes,
within ``jwks_ttl_s``. While the issuer is unreachable, keys already fetched keep verifying; a token whose key was
never seen gets 503 ``issuer_unavailable``.

Deny by default: a token that grants no model (no ``models`` claim, no ``model:NAME`` scope) is refused with 403,
unless the configuration names a claim value that grants every model (``all_models_value``, e.g. ``"*"``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slipway.serve.errors import Forbidden, Overloaded, Unauthorized

log = logging.getLogger(__name__)
ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})


class IssuerUnavailable(Overloaded):
    """The issuer's JWKS cannot be fetched and the token's key was never seen (503)."""

    code = "issuer_unavailable"


class Tier(BaseModel):
    """Rate limits of one tier, as a tier claim names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=1, description="Requests per minute. Default unlimited.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute. Default unlimited.")


class OidcConfig(BaseModel):
    """How the gateway trusts an OIDC issuer and reads its tokens (``GatewaySettings.oidc``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str = Field(description="The issuer URL, exactly as tokens carry it in `iss`; required.")
    audience: str = Field(description="The client id tokens must be issued for (`aud`); required.")
    algorithms: tuple[str, ...] = Field(
        default=("RS256", "ES256"), description="Accepted signature algorithms, asymmetric only. Default RS256, ES256."
    )
    subject_claim: str = Field(default="sub", description="Who the caller is. Default `sub`.")
    team_claim: str | None = Field(
        default="team", description="Claim naming the caller's team (budgets). Default `team`."
    )
    models_claim: str = Field(
        default="models", description="Claim listing allowed models (a list, or a space-separated string)."
    )
    scope_prefix: str = Field(
        default="model:", description="`scope` entries with this prefix grant a model too (`model:demo`)."
    )
    all_models_value: str | None = Field(
        default=None, description="A models value that grants every model (e.g. `*`). Default none: deny by default."
    )
    tier_claim: str | None = Field(default="tier", description="Claim naming the rate-limit tier. Default `tier`.")
    tiers: dict[str, Tier] = Field(default_factory=dict, description="Rate limits per tier name. Default none.")
    default_tier: str | None = Field(default=None, description="Tier of a token without (or with an unknown) tier.")
    jwks_ttl_s: float = Field(default=300.0, gt=0, description="How long fetched keys are trusted. Default 300 s.")
    jwks_min_refresh_s: float = Field(
        default=10.0, ge=0, description="An unknown `kid` refetches the JWKS at most this often. Default 10 s."
    )
    leeway_s: float = Field(default=0.0, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat. Default 0.")
    http_timeout_s: float = Field(default=5.0, gt=0, description="Timeout of discovery and JWKS requests.")

    def model_post_init(self, _ctx: Any) -> None:
        bad = [a for a in self.algorithms if a not in ASYMMETRIC]
        if bad or not self.algorithms:
            raise ValueError(f"oidc.algorithms: only asymmetric algorithms are accepted, not {bad or 'none'}")
        if self.default_tier is not None and self.default_tier not in self.tiers:
            raise ValueError(f"oidc.default_tier: {self.default_tier!r} is not one of oidc.tiers")


class OidcVerifier:
    """Verifies tokens of one issuer; thread-safe (the gateway calls it off its event loop)."""

    def __init__(self, config: OidcConfig, *, clock: Any = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}  # kid -> jwt.PyJWK
        self._fetched_at: float | None = None
        self._jwks_uri: str | None = None
        self.fetches = 0  # JWKS fetches so far (tests and logs)

    # --- keys ------------------------------------------------------------------------------------------------------

    def _get(self, url: str) -> dict[str, Any]:
        import httpx

        r = httpx.get(url, timeout=self.config.http_timeout_s, follow_redirects=False)
        r.raise_for_status()
        return dict(r.json())

    def _discover(self) -> str:
        if self._jwks_uri is None:
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = self._get(url)
            if doc.get("issuer") != self.config.issuer:  # OpenID Connect Discovery 1.0, section 4.3
                raise ValueError(f"discovery document of {url} names issuer {doc.get('issuer')!r}")
            if not doc.get("jwks_uri"):
                raise ValueError(f"discovery document of {url} has no jwks_uri")
            self._jwks_uri = str(doc["jwks_uri"])
        return self._jwks_uri

    def _refresh(self) -> None:
        import jwt

        keys: dict[str, Any] = {}
        for jwk in self._get(self._discover()).get("keys", []):
            try:
                key = jwt.PyJWK(jwk)
            except jwt.PyJWTError as e:  # a key type this gateway cannot use: skip it, keep the others
                log.warning("skipping JWKS key %s of %s: %s", jwk.get("kid"), self.config.issuer, e)
                continue
            if jwk.get("kid") and jwk.get("use", "sig") == "sig":
                keys[str(jwk["kid"])] = key
        self._keys, self._fetched_at = keys, self._clock()
        self.fetches += 1

    def signing_key(self, kid: str) -> Any:
        """The issuer's key ``kid``, fetching the JWKS when the cache is stale or does not know it."""
        with self._lock:
            now = self._clock()
            stale = self._fetched_at is None or now - self._fetched_at >= self.config.jwks_ttl_s
            may_refetch = self._fetched_at is None or now - self._fetched_at >= self.config.jwks_min_refresh_s
            if stale or (kid not in self._keys and may_refetch):
                try:
                    self._refresh()
                except Exception as e:  # unreachable issuer, bad JSON: known keys keep verifying
                    log.warning("cannot fetch the JWKS of %s: %s", self.config.issuer, e)
                    if kid not in self._keys:
                        raise IssuerUnavailable(
                            f"the token issuer's keys cannot be fetched now: {e}", headers={"retry-after": "5"}
                        ) from None
            key = self._keys.get(kid)
        if key is None:
            raise Unauthorized(f"invalid token: unknown signing key {kid!r} (not in the issuer's JWKS)",
                               code="invalid_token")  # fmt: skip
        return key

    # --- tokens ----------------------------------------------------------------------------------------------------

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims when it is good; :class:`Unauthorized` (401) naming what is wrong otherwise."""
        import jwt

        cfg = self.config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise Unauthorized(f"invalid token: {e}", code="invalid_token") from None
        alg = header.get("alg")
        if alg not in cfg.algorithms:
            raise Unauthorized(
                f"invalid token: algorithm {alg!r} is not accepted (accepted: {', '.join(cfg.algorithms)})",
                code="invalid_token",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("invalid token: no key id (kid) in its header", code="invalid_token")
        key = self.signing_key(kid)
        if key.algorithm_name != alg:  # the key's own (declared, or implied by its type and curve) algorithm only
            raise Unauthorized(
                f"invalid token: key {kid!r} is for {key.algorithm_name}, not {alg}", code="invalid_token"
            )
        try:
            return dict(
                jwt.decode(
                    token,
                    key.key,
                    algorithms=[alg],
                    audience=cfg.audience,
                    issuer=cfg.issuer,
                    leeway=cfg.leeway_s,
                    options={"require": ["exp", "iat", "iss", "aud", cfg.subject_claim]},
                )
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired", code="token_expired") from None
        except jwt.PyJWTError as e:
            raise Unauthorized(f"invalid token: {e}", code="invalid_token") from None

    def grants(self, claims: Mapping[str, Any]) -> tuple[str, str | None, frozenset[str], Tier]:
        """(subject, team, models, tier) the claims map to; :class:`Forbidden` (403) when they grant no model.
        ``models`` empty means every model, and only ``all_models_value`` yields it."""
        cfg = self.config
        models = _words(claims.get(cfg.models_claim))
        models |= {
            s.removeprefix(cfg.scope_prefix) for s in _words(claims.get("scope")) if s.startswith(cfg.scope_prefix)
        }
        if cfg.all_models_value is not None and cfg.all_models_value in models:
            models = set()
        elif not models:
            raise Forbidden(
                f"this token grants no model: its issuer must add a {cfg.models_claim!r} claim or a "
                f"'{cfg.scope_prefix}NAME' scope",
                code="no_models_granted",
            )
        team = claims.get(cfg.team_claim) if cfg.team_claim else None
        tier_name = claims.get(cfg.tier_claim) if cfg.tier_claim else None
        tier = cfg.tiers.get(str(tier_name)) if tier_name is not None else None
        if tier is None:
            tier = cfg.tiers.get(cfg.default_tier or "", Tier())
        return f"oidc:{claims[cfg.subject_claim]}", (str(team) if team else None), frozenset(models), tier


def _words(value: Any) -> set[str]:
    if isinstance(value, str):
        return {w for w in value.split() if w}
    if isinstance(value, list | tuple):
        return {str(w) for w in value if w}
    return set()

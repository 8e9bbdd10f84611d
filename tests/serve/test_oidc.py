"""SSO for the gateway against a real OpenID Connect issuer: OpenBao's identity tokens (discovery document, JWKS,
named keys that rotate), minted for a real userpass login whose entity carries the team, models and tier.

Every refusal is OpenAI-shaped (``{"error": {message, type, param, code}}``) with 401, 403 or 503; nothing here
is a double: the issuer, its keys and its tokens are OpenBao's own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from dataclasses import dataclass

import pytest

from slipway.serve.auth import Authenticator, Principal
from slipway.serve.errors import Forbidden, ServeError, Unauthorized
from slipway.serve.oidc import IssuerUnavailable, OidcConfig

CLAIMS = '{"team": {{identity.entity.metadata.team}}, "models": {{identity.entity.metadata.models}}, ' \
         '"tier": {{identity.entity.metadata.tier}}}'  # fmt: skip


@dataclass
class Issuer:
    """OpenBao set up as an identity provider: key ``key`` signs role ``role``'s tokens for a logged-in entity."""

    bao: object
    suffix: str
    user_token: str
    entity_id: str
    client_id: str  # the audience of role's tokens

    @property
    def url(self) -> str:
        return f"{self.bao.url}/v1/identity/oidc"  # type: ignore[attr-defined]

    def root(self):
        return self.bao.client()  # type: ignore[attr-defined]

    def write(self, path: str, **data) -> dict:
        return self.root().adapter.post(f"/v1/{path}", json=data) or {}

    def token(self, role: str | None = None) -> str:
        c = self.bao.client(self.user_token)  # type: ignore[attr-defined]
        return str(c.adapter.get(f"/v1/identity/oidc/token/{role or 'gw-' + self.suffix}")["data"]["token"])

    def client_id_of(self, role: str) -> str:
        return str(self.root().adapter.get(f"/v1/identity/oidc/role/{role}")["data"]["client_id"])

    def config(self, **over) -> OidcConfig:
        base = {"issuer": self.url, "audience": self.client_id, "tiers": {"gold": {"rpm": 600, "tpm": 90_000}},
                "jwks_ttl_s": 300.0, "jwks_min_refresh_s": 0.0}  # fmt: skip
        return OidcConfig.model_validate(base | over)


@pytest.fixture(scope="module")
def issuer(openbao) -> Issuer:
    s = uuid.uuid4().hex[:8]
    root = openbao.client()
    root.adapter.post("/v1/identity/oidc/config", json={"issuer": openbao.url})
    root.adapter.post(f"/v1/identity/oidc/key/k-{s}", json={"algorithm": "RS256", "allowed_client_ids": "*",
                                                            "verification_ttl": "1h"})  # fmt: skip
    root.adapter.post(f"/v1/identity/oidc/role/gw-{s}", json={"key": f"k-{s}", "ttl": "5m", "template": CLAIMS})
    root.adapter.post(f"/v1/identity/oidc/role/other-{s}", json={"key": f"k-{s}", "ttl": "5m", "template": CLAIMS})
    root.adapter.post(f"/v1/identity/oidc/role/bare-{s}", json={"key": f"k-{s}", "ttl": "5m"})  # no models claim
    root.adapter.post(f"/v1/identity/oidc/role/short-{s}", json={"key": f"k-{s}", "ttl": "1s", "template": CLAIMS})
    root.sys.enable_auth_method("userpass", path=f"up-{s}")
    root.sys.create_or_update_policy(f"tokens-{s}", 'path "identity/oidc/token/*" { capabilities = ["read"] }')
    root.adapter.post(f"/v1/auth/up-{s}/users/svc", json={"password": "pw", "token_policies": f"tokens-{s}"})
    login = root.adapter.post(f"/v1/auth/up-{s}/login/svc", json={"password": "pw"})["auth"]
    root.adapter.post(f"/v1/identity/entity/id/{login['entity_id']}",
                      json={"metadata": {"team": "ml", "models": "demo other", "tier": "gold"}})  # fmt: skip
    client_id = str(root.adapter.get(f"/v1/identity/oidc/role/gw-{s}")["data"]["client_id"])
    return Issuer(openbao, s, login["client_token"], login["entity_id"], client_id)


def authenticate(auth: Authenticator, token: str) -> Principal:
    return asyncio.run(auth.authenticate(f"Bearer {token}"))


def refusal(auth: Authenticator, token: str) -> ServeError:
    with pytest.raises(ServeError) as e:
        authenticate(auth, token)
    return e.value


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _parts(token: str) -> tuple[dict, dict]:
    h, c = token.split(".")[:2]
    return json.loads(base64.urlsafe_b64decode(h + "==")), json.loads(base64.urlsafe_b64decode(c + "=="))


# --- accepted ------------------------------------------------------------------------------------------------------


def test_a_token_of_the_issuer_maps_its_claims_to_team_models_and_tier(issuer):
    auth = Authenticator(None, oidc=issuer.config())
    p = authenticate(auth, issuer.token())
    assert p == Principal(subject=f"oidc:{issuer.entity_id}", team="ml", models=frozenset({"demo", "other"}),
                          rpm=600, tpm=90_000)  # fmt: skip
    p.check_model("demo")
    with pytest.raises(Forbidden, match="may not use model 'secret'") as e:
        p.check_model("secret")
    assert (e.value.status, e.value.body()["error"]["type"]) == (403, "permission_error")


def test_a_key_rotated_in_mid_test_is_accepted_and_an_unknown_kid_fetches_the_jwks_again(issuer):
    s = uuid.uuid4().hex[:6]
    issuer.write(f"identity/oidc/key/a-{s}", algorithm="RS256", allowed_client_ids="*", verification_ttl="1h")
    issuer.write(f"identity/oidc/role/r-{s}", key=f"a-{s}", ttl="5m", template=CLAIMS)
    auth = Authenticator(None, oidc=issuer.config(audience=issuer.client_id_of(f"r-{s}")), cache_ttl_s=0)
    before = issuer.token(f"r-{s}")
    authenticate(auth, before)
    assert auth.oidc.fetches == 1
    issuer.write(f"identity/oidc/key/a-{s}/rotate")  # OpenBao published the next key ahead: no fetch needed
    rotated = issuer.token(f"r-{s}")
    assert _parts(rotated)[0]["kid"] != _parts(before)[0]["kid"]
    assert authenticate(auth, rotated).team == "ml"
    assert authenticate(auth, before).team == "ml"  # the rotated-out key stays published for its verification TTL
    issuer.write(f"identity/oidc/key/b-{s}", algorithm="ES256", allowed_client_ids="*", verification_ttl="1h")
    issuer.write(f"identity/oidc/role/r-{s}", key=f"b-{s}")  # a key the cached JWKS has never listed
    fresh = issuer.token(f"r-{s}")
    assert _parts(fresh)[0]["alg"] == "ES256"
    assert authenticate(auth, fresh).team == "ml"  # accepted without a restart ...
    assert auth.oidc.fetches == 2  # ... after one fetch, on its unknown kid


def test_a_key_withdrawn_by_the_issuer_stops_verifying_when_the_cache_refreshes(issuer):
    s = uuid.uuid4().hex[:6]
    issuer.write(f"identity/oidc/key/old-{s}", algorithm="ES256", allowed_client_ids="*", verification_ttl="1h")
    issuer.write(f"identity/oidc/key/new-{s}", algorithm="ES256", allowed_client_ids="*", verification_ttl="1h")
    issuer.write(f"identity/oidc/role/rot-{s}", key=f"old-{s}", ttl="5m", template=CLAIMS)
    auth = Authenticator(None, oidc=issuer.config(audience=issuer.client_id_of(f"rot-{s}"), jwks_ttl_s=0.5),
                         cache_ttl_s=0)  # fmt: skip
    old = issuer.token(f"rot-{s}")
    assert authenticate(auth, old).models == {"demo", "other"}
    issuer.write(f"identity/oidc/role/rot-{s}", key=f"new-{s}")  # the issuer moves to a new key ...
    issuer.root().adapter.delete(f"/v1/identity/oidc/key/old-{s}")  # ... and withdraws the old one
    time.sleep(0.6)
    e = refusal(auth, old)
    assert (e.status, e.code) == (401, "invalid_token")
    assert str(e) == f"invalid token: unknown signing key {_parts(old)[0]['kid']!r} (not in the issuer's JWKS)"
    assert authenticate(auth, issuer.token(f"rot-{s}")).team == "ml"


# --- the attack table: each refused -----------------------------------------------------------------------------------


def test_an_expired_token_is_refused(issuer):
    auth = Authenticator(None, oidc=issuer.config(), cache_ttl_s=0)
    token = issuer.token(f"short-{issuer.suffix}")
    time.sleep(1.6)
    e = refusal(auth, token)
    assert (e.status, e.code, str(e)) == (401, "token_expired", "token expired")
    assert e.body() == {"error": {"message": "token expired", "type": "authentication_error", "param": None,
                                  "code": "token_expired"}}  # fmt: skip


def test_a_token_for_another_audience_is_refused(issuer):
    auth = Authenticator(None, oidc=issuer.config())
    e = refusal(auth, issuer.token(f"other-{issuer.suffix}"))
    assert (e.status, e.code, str(e)) == (401, "invalid_token", "invalid token: Audience doesn't match")


def test_a_token_from_another_issuer_is_refused(issuer):
    auth = Authenticator(None, oidc=issuer.config())
    issuer.write("identity/oidc/config", issuer=issuer.bao.url.replace("127.0.0.1", "localhost"))  # another iss
    try:
        token = issuer.token()
    finally:
        issuer.write("identity/oidc/config", issuer=issuer.bao.url)
    assert _parts(token)[1]["iss"] != issuer.url
    e = refusal(auth, token)
    assert (e.status, e.code, str(e)) == (401, "invalid_token", "invalid token: Invalid issuer")


def test_alg_none_and_hmac_with_the_public_key_are_refused_before_any_key_is_used(issuer):
    auth = Authenticator(None, oidc=issuer.config(), cache_ttl_s=0)
    header, claims = _parts(issuer.token())
    unsigned = f"{_b64(header | {'alg': 'none'})}.{_b64(claims)}."
    e = refusal(auth, unsigned)
    assert (e.status, str(e)) == (401, "invalid token: algorithm 'none' is not accepted (accepted: RS256, ES256)")
    hmac = f"{_b64(header | {'alg': 'HS256'})}.{_b64(claims)}.c2lnbmF0dXJl"
    assert str(refusal(auth, hmac)) == "invalid token: algorithm 'HS256' is not accepted (accepted: RS256, ES256)"
    assert auth.oidc.fetches == 0


def test_an_unknown_kid_is_refused_and_a_flood_of_them_fetches_the_jwks_at_most_once(issuer):
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    own = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    auth = Authenticator(None, oidc=issuer.config(jwks_min_refresh_s=60), cache_ttl_s=0)
    authenticate(auth, issuer.token())
    fetches = auth.oidc.fetches
    _, claims = _parts(issuer.token())
    for i in range(20):
        forged = jwt.encode(claims, own, algorithm="RS256", headers={"kid": f"made-up-{i}"})
        e = refusal(auth, forged)
        assert e.status == 401
        assert str(e) == f"invalid token: unknown signing key 'made-up-{i}' (not in the issuer's JWKS)"
    assert auth.oidc.fetches == fetches  # the last fetch was less than jwks_min_refresh_s ago
    # a real kid with a forged signature
    real = _parts(issuer.token())[0]["kid"]
    e = refusal(auth, jwt.encode(claims, own, algorithm="RS256", headers={"kid": real}))
    assert (e.status, str(e)) == (401, "invalid token: Signature verification failed")


def test_a_valid_token_without_a_models_claim_is_denied_by_default(issuer):
    auth = Authenticator(None, oidc=issuer.config(audience=issuer.client_id_of(f"bare-{issuer.suffix}")))
    e = refusal(auth, issuer.token(f"bare-{issuer.suffix}"))
    assert e.body() == {"error": {"type": "permission_error", "code": "no_models_granted", "param": None,
                                  "message": "this token grants no model: its issuer must add a 'models' claim or "
                                             "a 'model:NAME' scope"}}  # fmt: skip
    assert e.status == 403


def test_every_model_only_when_the_configuration_says_which_claim_value_grants_it(issuer):
    issuer.write(f"identity/entity/id/{issuer.entity_id}", metadata={"team": "ml", "models": "*", "tier": "gold"})
    try:
        token = issuer.token()
        with pytest.raises(Forbidden, match="may not use model 'demo'"):  # '*' is just a name by default
            authenticate(Authenticator(None, oidc=issuer.config()), token).check_model("demo")
        p = authenticate(Authenticator(None, oidc=issuer.config(all_models_value="*")), token)
        assert p.models == frozenset()
        p.check_model("anything")
    finally:
        issuer.write(f"identity/entity/id/{issuer.entity_id}",
                     metadata={"team": "ml", "models": "demo other", "tier": "gold"})  # fmt: skip


def test_an_unreachable_issuer_answers_503_for_a_key_never_seen(issuer):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    auth = Authenticator(None, oidc=issuer.config(issuer=f"http://127.0.0.1:{port}/v1/identity/oidc"))
    e = refusal(auth, issuer.token())
    assert isinstance(e, IssuerUnavailable) and (e.status, e.code) == (503, "issuer_unavailable")


def test_a_legacy_shared_secret_token_without_models_is_denied_by_default():
    import jwt

    from slipway.serve.auth import JwtConfig

    secret = "test-secret-for-jwt-hs256-32bytes!"
    auth = Authenticator(None, jwt=JwtConfig(secret=secret))
    token = jwt.encode({"sub": "svc", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    e = refusal(auth, token)
    assert (e.status, e.code) == (403, "no_models_granted")
    assert isinstance(refusal(auth, "a.b.c"), Unauthorized)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"algorithms": ["HS256"]}, "only asymmetric algorithms are accepted, not ['HS256']"),
        ({"algorithms": ["none"]}, "only asymmetric algorithms are accepted, not ['none']"),
        ({"default_tier": "platinum"}, "oidc.default_tier: 'platinum' is not one of oidc.tiers"),
    ],
    ids=["hmac", "none", "unknown-tier"],
)
def test_configurations_that_would_weaken_verification_are_refused(over, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        OidcConfig.model_validate({"issuer": "https://idp.example", "audience": "gw"} | over)


# --- over HTTP, through a gateway deployed with the issuer ---------------------------------------------------------


@pytest.mark.xdist_group("ray")
@pytest.mark.slow
def test_the_gateway_over_http_takes_the_issuer_s_tokens_and_refuses_in_openai_s_shape(stack, issuer):
    """A second gateway application on the test cluster, configured with the issuer (GatewaySettings.oidc): the
    issuer's token lists the models it grants (none of the live ones), a live model it does not grant is 403, an
    expired or forged token 401; every refusal in OpenAI's error shape."""
    import httpx
    from ray import serve

    from slipway.serve.gateway import Gateway
    from tests.plugins.serving import ECHO

    settings = {"oidc": issuer.config().model_dump(mode="json"), "key_cache_ttl_s": 0.0}
    serve.run(Gateway.options(num_replicas=1).bind(settings), name="sso-gateway", route_prefix="/sso")
    base = f"{stack.base_url}/sso"
    try:
        token = issuer.token()

        def post(bearer: str) -> httpx.Response:
            body = {"model": ECHO, "prompt": "a b", "max_tokens": 2}
            return httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {bearer}"})

        models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert models.status_code == 200 and models.json()["data"] == []  # it grants demo and other only
        denied = post(token)
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed", denied.text
        header, claims = _parts(token)
        forged = ".".join([_b64(header), _b64({**claims, "models": [ECHO]}), token.split(".")[2]])
        for bad, code in ((forged, "invalid_token"), ("not-a-jwt", "invalid_api_key")):
            r = post(bad)
            assert r.status_code == 401, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.json()["error"]["code"] == code
    finally:
        serve.delete("sso-gateway")

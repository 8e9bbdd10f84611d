"""vault:// references resolved by hvac against a real OpenBao server holding production's ``slipway`` policy;
AppRole and Kubernetes login; tokens renewed; nothing logged."""

from __future__ import annotations

import base64
import os
import time
import uuid

import pytest
from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from slipway import secrets
from slipway.secrets import SecretError, VaultClient, VaultResolvingSettings, VaultSettings
from tests.plugins.openbao import PROMPTS_KEY, SLIPWAY_POLICY

# One worker runs the whole module in order, so the last test sees every log line the others produced.
pytestmark = [pytest.mark.usefixtures("all_log_lines"), pytest.mark.xdist_group("secrets-logs")]

DB_PASSWORD = "pw-7f3a9c1e2d"  # every secret value used here; none may appear in any log line
JWT_KEY = "jwt-5b8e0d4c6a91f2"
SECRETS = [DB_PASSWORD, JWT_KEY]  # ... and every token, secret id and service-account token the tests obtain


@pytest.fixture
def kv(vault_env):
    vault_env.put("secret", "slipway/db", {"password": DB_PASSWORD, "user": "slipway"})
    vault_env.put("secret", "slipway/gateway", {"jwt_key": JWT_KEY})
    SECRETS.extend([vault_env.root_token, os.environ["SLIPWAY_VAULT_TOKEN"]])
    return vault_env


def approle(bao, name, **ttls):
    """AppRole role ``name`` with the ``slipway`` policy; its settings for VaultClient (role id = name)."""
    secret_id = bao.approle(name, policies=[SLIPWAY_POLICY], **ttls)
    SECRETS.append(secret_id)
    return VaultSettings(addr=bao.url, auth="approle", role_id=name, secret_id=secret_id, cache_ttl_s=0)


def test_a_reference_resolves_through_kv_v2_over_http(kv):
    mark = kv.audit_mark()
    assert secrets.resolve("vault://secret/slipway/db#password") == DB_PASSWORD
    assert "read secret/data/slipway/db" in kv.calls(mark)


def test_a_database_url_embeds_a_reference(kv):
    url = "postgresql://slipway:${vault://secret/slipway/db#password}@db:5432/slipway"
    assert secrets.expand(url) == f"postgresql://slipway:{DB_PASSWORD}@db:5432/slipway"


def test_plain_values_are_the_environment_fallback(monkeypatch):
    monkeypatch.delenv("SLIPWAY_VAULT_ADDR", raising=False)
    secrets.default_client.cache_clear()
    assert secrets.resolve("postgresql://u:plain@h/db") == "postgresql://u:plain@h/db"
    with pytest.raises(SecretError, match=r"a vault:// reference needs SLIPWAY_VAULT_ADDR \(the Vault address\)"):
        secrets.resolve("vault://secret/slipway/db#password")


@pytest.mark.parametrize(
    "ref, error",
    [
        ("vault://secret/slipway/db", r"malformed secret reference 'vault://secret/slipway/db': expected vault://"),
        ("vault://secret/slipway/nope#password", r"vault://secret/slipway/nope#password: no secret at secret/"),
        ("vault://secret/slipway/db#pasword", r"the secret has no key 'pasword' \(keys: password, user\)"),
    ],
    ids=["no-key", "no-path", "wrong-key"],
)
def test_bad_references_are_one_line_errors_without_values(kv, ref, error):
    with pytest.raises(SecretError, match=error) as e:
        secrets.resolve(ref)
    assert DB_PASSWORD not in str(e.value)


def test_a_deleted_secret_does_not_resolve_to_an_older_version(kv):
    kv.put("secret", "slipway/retired", {"password": "old-" + DB_PASSWORD})
    kv.put("secret", "slipway/retired", {"password": "new-" + DB_PASSWORD})
    SECRETS.extend(["old-" + DB_PASSWORD, "new-" + DB_PASSWORD])
    assert secrets.resolve("vault://secret/slipway/retired#password") == "new-" + DB_PASSWORD
    kv.client().secrets.kv.v2.delete_latest_version_of_secret(path="slipway/retired", mount_point="secret")
    c = VaultClient(VaultSettings(addr=kv.url, token=os.environ["SLIPWAY_VAULT_TOKEN"]))
    with pytest.raises(SecretError, match=r"vault://secret/slipway/retired#password: no secret at secret/slipway/"):
        c.read("vault://secret/slipway/retired#password")


def test_the_slipway_policy_denies_secrets_outside_slipway(kv):
    kv.put("secret", "billing/stripe", {"key": "sk-" + DB_PASSWORD})
    SECRETS.append("sk-" + DB_PASSWORD)
    with pytest.raises(SecretError, match=r"^vault://secret/billing/stripe#key: permission denied by Vault$"):
        secrets.resolve("vault://secret/billing/stripe#key")


def test_approle_login(kv):
    st = approle(kv, "login-test")
    mark = kv.audit_mark()
    assert VaultClient(st).read("vault://secret/slipway/gateway#jwt_key") == JWT_KEY
    assert kv.calls(mark)[:2] == ["update auth/approle/login", "read secret/data/slipway/gateway"]
    bad = st.model_copy(update={"secret_id": SecretStr("wrong")})
    with pytest.raises(SecretError, match=r"cannot log in to Vault at http://127.0.0.1:\d+ \(approle\): invalid role"):
        VaultClient(bad).read("vault://secret/slipway/gateway#jwt_key")


def test_kubernetes_login_reads_the_service_account_token(kv, tmp_path):
    """The role and policy are infra/vault's; the service-account token is reviewed by the TokenReview double."""
    jwt = kv.kubernetes.service_account_jwt()
    SECRETS.append(jwt)
    (tmp_path / "token").write_text(jwt + "\n")
    st = VaultSettings(addr=kv.url, auth="kubernetes", k8s_role="slipway", k8s_jwt_path=tmp_path / "token")
    assert VaultClient(st).read("vault://secret/slipway/db#user") == "slipway"
    missing = VaultSettings(addr=kv.url, auth="kubernetes", k8s_role="slipway", k8s_jwt_path=tmp_path / "nope")
    with pytest.raises(SecretError, match=r"cannot read the service-account token .*nope"):
        VaultClient(missing).read("vault://secret/slipway/db#user")


def test_kubernetes_login_refuses_a_service_account_the_role_does_not_bind(kv, tmp_path):
    (tmp_path / "token").write_text(kv.kubernetes.service_account_jwt(namespace="default", name="slipway"))
    st = VaultSettings(addr=kv.url, auth="kubernetes", k8s_role="slipway", k8s_jwt_path=tmp_path / "token")
    with pytest.raises(SecretError, match=r"cannot log in to Vault at .* \(kubernetes\): .*not authorized"):
        VaultClient(st).read("vault://secret/slipway/db#user")


def test_the_token_is_renewed_before_it_expires(kv):
    c = VaultClient(approle(kv, "renewal-test", token_ttl="2s"))
    mark = kv.audit_mark()
    c.start_renewal(min_interval_s=0.2)
    try:
        time.sleep(3.0)  # past the first token's TTL
        assert kv.calls(mark).count("update auth/token/renew-self") >= 2
        assert c.read("vault://secret/slipway/db#password") == DB_PASSWORD
    finally:
        c.stop()


def test_an_expired_token_is_replaced_by_a_fresh_login(kv):
    st = approle(kv, "expiry-test", token_ttl="1s")
    mark = kv.audit_mark()
    c = VaultClient(st)
    c.read("vault://secret/slipway/db#user")
    time.sleep(1.5)
    kv.client().auth.approle.create_or_update_approle("expiry-test", token_policies=[SLIPWAY_POLICY], token_ttl="60s")
    assert c.renew() == pytest.approx(60, abs=2)  # renew-self was refused, so it logged in again
    calls = kv.calls(mark)
    assert "update auth/token/renew-self: permission denied" in calls
    assert calls.count("update auth/approle/login") == 2
    assert c.read("vault://secret/slipway/db#password") == DB_PASSWORD


class GatewaySecrets(VaultResolvingSettings):
    model_config = SettingsConfigDict(env_prefix="TEST_GW_")

    jwt_secret: SecretStr
    database_url: str
    webhook: str = "https://hooks.example/none"


def test_a_settings_class_resolves_references_in_every_field(kv, monkeypatch):
    monkeypatch.setenv("TEST_GW_JWT_SECRET", "vault://secret/slipway/gateway#jwt_key")
    monkeypatch.setenv("TEST_GW_DATABASE_URL", "postgresql://u:${vault://secret/slipway/db#password}@h/db")
    st = GatewaySecrets()
    assert st.jwt_secret.get_secret_value() == JWT_KEY
    assert st.database_url == f"postgresql://u:{DB_PASSWORD}@h/db"
    assert JWT_KEY not in repr(st)


def test_slipway_settings_resolve_the_registry_url_and_s3_credentials(kv, monkeypatch):
    """The settings slipway itself reads — the registry URL, S3 credentials, the gateway's JWT key — take
    references; the S3 client is built with the resolved keys."""
    from slipway.artifacts.s3 import S3Settings, _client
    from slipway.serve.gateway import _secret
    from slipway.settings import Settings

    kv.put("secret", "slipway/s3", {"id": "AKIAVAULTEXAMPLE", "key": "s3-secret-" + DB_PASSWORD})
    SECRETS.append("s3-secret-" + DB_PASSWORD)
    monkeypatch.setenv("SLIPWAY_DATABASE_URL", "postgresql://slipway:${vault://secret/slipway/db#password}@db/slipway")
    monkeypatch.setenv("SLIPWAY_S3_ACCESS_KEY_ID", "vault://secret/slipway/s3#id")
    monkeypatch.setenv("SLIPWAY_S3_SECRET_ACCESS_KEY", "vault://secret/slipway/s3#key")
    assert Settings().resolved_database_url == f"postgresql://slipway:{DB_PASSWORD}@db/slipway"
    st = S3Settings()
    assert st.secret_access_key.get_secret_value() == "s3-secret-" + DB_PASSWORD
    assert DB_PASSWORD not in repr(st)
    creds = _client(st)._request_signer._credentials
    assert (creds.access_key, creds.secret_key) == ("AKIAVAULTEXAMPLE", "s3-secret-" + DB_PASSWORD)
    assert _secret("vault://secret/slipway/gateway#jwt_key") == JWT_KEY
    assert _secret("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_transit_encrypts_and_decrypts_with_the_slipway_key(kv):
    c = VaultClient(VaultSettings(addr=kv.url, token=os.environ["SLIPWAY_VAULT_TOKEN"]))
    mark = kv.audit_mark()
    ct = c.encrypt(PROMPTS_KEY, DB_PASSWORD.encode())
    assert ct.startswith("vault:v") and DB_PASSWORD not in ct
    assert c.decrypt(PROMPTS_KEY, ct) == DB_PASSWORD.encode()
    assert kv.calls(mark)[-2:] == [f"update transit/encrypt/{PROMPTS_KEY}", f"update transit/decrypt/{PROMPTS_KEY}"]


def test_transit_refusals_are_secret_errors(kv):
    """OpenBao refuses a key the slipway policy does not grant (the double created any key on first use) and an
    altered ciphertext; both come back as one-line SecretErrors, not raw hvac errors."""
    c = VaultClient(VaultSettings(addr=kv.url, token=os.environ["SLIPWAY_VAULT_TOKEN"]))
    with pytest.raises(SecretError, match=r"^transit key transit/prompt-logs: cannot encrypt: permission denied by"):
        c.encrypt("prompt-logs", b"x")
    ct = c.encrypt(PROMPTS_KEY, DB_PASSWORD.encode())
    body = base64.b64decode(ct.split(":", 2)[2])
    altered = ct.rsplit(":", 1)[0] + ":" + base64.b64encode(body[:-1] + bytes([body[-1] ^ 1])).decode()
    with pytest.raises(SecretError, match=rf"^transit key transit/{PROMPTS_KEY}: cannot decrypt: cipher: message auth"):
        c.decrypt(PROMPTS_KEY, altered)


PG_CREATE_ROLE = "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"


def test_a_dynamic_database_credential_lease_is_renewed(kv, postgres_url):
    """A real dynamic secret: OpenBao's database engine creates a PostgreSQL role with a 30 s lease; the slipway
    policy (sys/leases/renew) extends it. An unknown lease is a SecretError."""
    from sqlalchemy.engine import make_url

    pg, mount = make_url(postgres_url), f"database-{uuid.uuid4().hex[:8]}"
    root = kv.client()
    root.sys.enable_secrets_engine("database", path=mount)
    root.secrets.database.configure(
        name="registry", plugin_name="postgresql-database-plugin", mount_point=mount, allowed_roles=["reader"],
        connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@{pg.host}:{pg.port or 5432}/{pg.database}"
        "?sslmode=disable", username=pg.username, password=pg.password or "trust",
    )  # fmt: skip
    root.secrets.database.create_role(
        name="reader", db_name="registry", mount_point=mount, default_ttl="30s", max_ttl="1h",
        creation_statements=[PG_CREATE_ROLE],
    )  # fmt: skip
    creds = root.secrets.database.generate_credentials(name="reader", mount_point=mount)
    SECRETS.append(creds["data"]["password"])
    try:
        assert creds["lease_duration"] == 30
        c = VaultClient(VaultSettings(addr=kv.url, token=os.environ["SLIPWAY_VAULT_TOKEN"]))
        assert c.renew_lease(creds["lease_id"], increment=600) == 600
        with pytest.raises(SecretError, match=rf"^cannot renew lease {mount}/creds/reader/nope: lease not found$"):
            c.renew_lease(f"{mount}/creds/reader/nope")
    finally:
        root.sys.revoke_lease(creds["lease_id"])  # drops the PostgreSQL role


def test_no_secret_value_appears_in_any_log_line(all_log_lines):
    assert any("slipway.secrets" in line for line in all_log_lines)  # the capture saw our loggers
    assert any("urllib3" in line for line in all_log_lines)  # ... and hvac's HTTP traffic
    leaked = [(s, line) for line in all_log_lines for s in SECRETS if s in line]
    assert leaked == []

"""Secrets: ``vault://MOUNT/PATH#KEY`` references resolved through Vault (hvac, KV v2), or plain values from the
environment for the embedded default.

Wherever a secret is configured — the database password, S3 credentials, the gateway's JWT key, a webhook
token — the setting may hold a reference instead of the value::

    SLIPWAY_DATABASE_URL='postgresql://slipway:${vault://secret/slipway/db#password}@db:5432/slipway'
    SLIPWAY_JWT_SECRET='vault://secret/slipway/gateway#jwt_key'

:func:`resolve` turns a whole-value reference into its value, :func:`expand` replaces ``${vault://...}`` inside
a string, and :class:`VaultReferences` is a pydantic-settings source that does both for every field of a
settings class. Vault is reached with token, AppRole or Kubernetes auth (``SLIPWAY_VAULT_*``); the login token
is renewed in the background before it expires, and a token that can no longer be renewed is replaced by a
fresh login. Secret values are never logged: log lines name the reference, never what it resolved to.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from slipway.errors import SlipwayError

log = logging.getLogger("slipway.secrets")
SCHEME = "vault://"
_REF = re.compile(r"^vault://(?P<mount>[A-Za-z0-9_.-]+)/(?P<path>[^#\s]+)#(?P<key>[^#\s]+)$")
_EMBEDDED = re.compile(r"\$\{(vault://[^}]+)\}")
_MULTI_ERROR = re.compile(r"\d+ errors? occurred:")


class SecretError(SlipwayError):
    """A secret reference is malformed or cannot be resolved (Vault unreachable, denied, missing key)."""


class VaultSettings(BaseSettings):
    """How slipway reaches Vault (env prefix ``SLIPWAY_VAULT_``)."""

    model_config = SettingsConfigDict(env_prefix="SLIPWAY_VAULT_", env_file=".env", extra="ignore")

    addr: str | None = Field(
        default=None, description="Vault address, e.g. https://vault:8200. Default none: references cannot resolve."
    )
    auth: Literal["token", "approle", "kubernetes"] = Field(
        default="token", description="How to log in: token, approle or kubernetes. Default token."
    )
    token: SecretStr | None = Field(default=None, description="Token for auth=token. No default.")
    role_id: str | None = Field(default=None, description="AppRole role id for auth=approle. No default.")
    secret_id: SecretStr | None = Field(default=None, description="AppRole secret id for auth=approle. No default.")
    approle_mount: str = Field(default="approle", description="Mount of the AppRole auth method. Default approle.")
    k8s_role: str | None = Field(default=None, description="Vault role for auth=kubernetes. No default.")
    k8s_jwt_path: Path = Field(
        default=Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        description="Service-account token file for auth=kubernetes. Default the in-pod path.",
    )
    k8s_mount: str = Field(default="kubernetes", description="Mount of the Kubernetes auth method. Default kubernetes.")
    namespace: str | None = Field(default=None, description="Vault Enterprise namespace. Default none.")
    ca_cert: str | None = Field(default=None, description="CA bundle to verify Vault's TLS. Default system CAs.")
    timeout_s: float = Field(default=10.0, gt=0, le=120, description="Seconds per request, 0-120. Default 10.")
    cache_ttl_s: float = Field(
        default=300.0, ge=0, le=86_400, description="Seconds a read secret is reused before re-reading. Default 300."
    )


@dataclass(frozen=True)
class SecretRef:
    """``vault://MOUNT/PATH#KEY``: key KEY of the KV v2 secret PATH under mount MOUNT."""

    mount: str
    path: str
    key: str

    @classmethod
    def parse(cls, text: str) -> SecretRef:
        m = _REF.match(text.strip())
        if m is None:
            raise SecretError(f"malformed secret reference {text!r}: expected vault://MOUNT/PATH#KEY")
        return cls(m["mount"], m["path"].strip("/"), m["key"])

    def __str__(self) -> str:
        return f"vault://{self.mount}/{self.path}#{self.key}"


class VaultClient:
    """An authenticated hvac client with a cache of KV v2 reads and background token renewal."""

    def __init__(self, settings: VaultSettings | None = None) -> None:
        self.settings = settings or VaultSettings()
        if not self.settings.addr:
            raise SecretError("a vault:// reference needs SLIPWAY_VAULT_ADDR (the Vault address)")
        self._lock = threading.RLock()
        self._client: Any = None
        self._token_expires: float | None = None  # monotonic; None: does not expire
        self._cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __repr__(self) -> str:  # never the token
        return f"VaultClient(addr={self.settings.addr!r}, auth={self.settings.auth!r})"

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._login()
            return self._client

    def _login(self) -> Any:
        import hvac
        from hvac import exceptions as hx
        from requests.exceptions import RequestException

        st = self.settings
        c = hvac.Client(url=st.addr, namespace=st.namespace, verify=st.ca_cert or True, timeout=st.timeout_s)
        try:
            if st.auth == "token":
                if st.token is None:
                    raise SecretError("SLIPWAY_VAULT_TOKEN is not set (auth=token)")
                c.token = st.token.get_secret_value()
                info = c.auth.token.lookup_self()["data"]
                ttl = info.get("ttl") or 0
            elif st.auth == "approle":
                if not st.role_id or st.secret_id is None:
                    raise SecretError("auth=approle needs SLIPWAY_VAULT_ROLE_ID and SLIPWAY_VAULT_SECRET_ID")
                auth = c.auth.approle.login(
                    role_id=st.role_id, secret_id=st.secret_id.get_secret_value(), mount_point=st.approle_mount
                )["auth"]
                ttl = auth.get("lease_duration") or 0
            else:
                if not st.k8s_role:
                    raise SecretError("auth=kubernetes needs SLIPWAY_VAULT_K8S_ROLE")
                try:
                    jwt = st.k8s_jwt_path.read_text().strip()
                except OSError as e:
                    raise SecretError(f"cannot read the service-account token {st.k8s_jwt_path}: {e.strerror}") from e
                auth = c.auth.kubernetes.login(role=st.k8s_role, jwt=jwt, mount_point=st.k8s_mount)["auth"]
                ttl = auth.get("lease_duration") or 0
        except (hx.VaultError, RequestException) as e:
            raise SecretError(f"cannot log in to Vault at {st.addr} ({st.auth}): {_reason(e)}") from e
        self._token_expires = time.monotonic() + ttl if ttl else None
        log.info("logged in to Vault at %s with %s auth (token ttl %ss)", st.addr, st.auth, ttl or "none")
        return c

    def read(self, ref: SecretRef | str) -> str:
        """The value of ``ref``. Raises :class:`SecretError` (naming the reference, never a value)."""
        from hvac import exceptions as hx
        from requests.exceptions import RequestException

        ref = SecretRef.parse(ref) if isinstance(ref, str) else ref
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((ref.mount, ref.path))
        if hit is not None and now - hit[0] < self.settings.cache_ttl_s:
            data = hit[1]
        else:
            try:
                resp = self.client.secrets.kv.v2.read_secret_version(
                    path=ref.path, mount_point=ref.mount, raise_on_deleted_version=True
                )
            except hx.InvalidPath as e:
                raise SecretError(f"{ref}: no secret at {ref.mount}/{ref.path}") from e
            except hx.Forbidden as e:
                raise SecretError(f"{ref}: permission denied by Vault") from e
            except (hx.VaultError, RequestException) as e:
                raise SecretError(f"{ref}: cannot read from Vault: {_reason(e)}") from e
            data = dict(resp["data"]["data"] or {})
            with self._lock:
                self._cache[(ref.mount, ref.path)] = (now, data)
        if ref.key not in data:
            raise SecretError(f"{ref}: the secret has no key {ref.key!r} (keys: {', '.join(sorted(data)) or 'none'})")
        log.debug("resolved %s", ref)
        return str(data[ref.key])

    # --- lease renewal --------------------------------------------------------------------------------------

    def renew(self) -> float | None:
        """Renew the login token; log in again when it cannot be renewed. The new TTL in seconds (None: none)."""
        from hvac import exceptions as hx
        from requests.exceptions import RequestException

        with self._lock:
            try:
                auth = self.client.auth.token.renew_self()["auth"]
                ttl = auth.get("lease_duration") or 0
                self._token_expires = time.monotonic() + ttl if ttl else None
                log.debug("renewed the Vault token (ttl %ss)", ttl)
            except (hx.VaultError, RequestException) as e:
                log.warning("cannot renew the Vault token (%s); logging in again", _reason(e))
                self._client = self._login()
            return None if self._token_expires is None else self._token_expires - time.monotonic()

    def renew_lease(self, lease_id: str, increment: int | None = None) -> int:
        """Extend the lease of a dynamic secret (database, AWS engines); its new duration in seconds. Raises
        :class:`SecretError` when Vault refuses (an unknown or expired lease, permission denied)."""
        from hvac import exceptions as hx
        from requests.exceptions import RequestException

        try:
            resp = self.client.sys.renew_lease(lease_id=lease_id, increment=increment)
        except (hx.VaultError, RequestException) as e:
            raise _refused(f"cannot renew lease {lease_id}", e) from e
        return int(resp.get("lease_duration", 0))

    def start_renewal(self, *, fraction: float = 2 / 3, min_interval_s: float = 1.0) -> None:
        """Renew the token in a daemon thread each time ``fraction`` of its TTL has passed."""
        if self._renewer is not None:
            return
        self.client  # noqa: B018 - log in now, so the first TTL is known

        def loop() -> None:
            while not self._stop.is_set():
                left = None if self._token_expires is None else self._token_expires - time.monotonic()
                wait = 300.0 if left is None else max(min_interval_s, left * (1 - fraction))
                if self._stop.wait(wait):
                    return
                try:
                    self.renew()
                except SecretError as e:
                    log.error("Vault token renewal failed: %s", e)

        self._renewer = threading.Thread(target=loop, name="vault-renewal", daemon=True)
        self._renewer.start()

    def stop(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
            self._renewer = None

    # --- transit --------------------------------------------------------------------------------------------

    def encrypt(self, key: str, plaintext: bytes, *, mount: str = "transit") -> str:
        """Vault transit ``encrypt``: the ciphertext (``vault:v1:...``); the plaintext never leaves this call.
        Raises :class:`SecretError` when Vault refuses (e.g. a key the token's policy does not grant)."""
        import base64

        from hvac import exceptions as hx
        from requests.exceptions import RequestException

        try:
            resp = self.client.secrets.transit.encrypt_data(
                name=key, plaintext=base64.b64encode(plaintext).decode(), mount_point=mount
            )
        except (hx.VaultError, RequestException) as e:
            raise _refused(f"transit key {mount}/{key}: cannot encrypt", e) from e
        return str(resp["data"]["ciphertext"])

    def decrypt(self, key: str, ciphertext: str, *, mount: str = "transit") -> bytes:
        """Vault transit ``decrypt``. Raises :class:`SecretError` when Vault refuses (an altered ciphertext fails
        authentication)."""
        import base64

        from hvac import exceptions as hx
        from requests.exceptions import RequestException

        try:
            resp = self.client.secrets.transit.decrypt_data(name=key, ciphertext=ciphertext, mount_point=mount)
        except (hx.VaultError, RequestException) as e:
            raise _refused(f"transit key {mount}/{key}: cannot decrypt", e) from e
        return base64.b64decode(resp["data"]["plaintext"])


def _reason(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if errors:
        # Vault and OpenBao send several errors as one string, "2 errors occurred:\n\t* a\n\t* b\n\n": one line
        lines = [ln.strip().lstrip("*").strip() for x in errors for ln in str(x).splitlines()]
        return "; ".join(ln for ln in lines if ln and not _MULTI_ERROR.fullmatch(ln)) or type(e).__name__
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _refused(what: str, e: Exception) -> SecretError:
    from hvac import exceptions as hx

    reason = "permission denied by Vault" if isinstance(e, hx.Forbidden) else _reason(e)
    return SecretError(f"{what}: {reason}")


@functools.cache
def default_client() -> VaultClient:
    """The process-wide client of ``SLIPWAY_VAULT_*``, logged in on first use, its token renewed."""
    c = VaultClient()
    c.start_renewal()
    return c


def is_reference(value: object) -> bool:
    return isinstance(value, str) and (value.startswith(SCHEME) or "${vault://" in value)


def resolve(value: str, *, client: VaultClient | None = None) -> str:
    """``value`` itself, or what the ``vault://`` reference (whole value or ``${...}`` inside it) points to."""
    if value.startswith(SCHEME):
        return (client or default_client()).read(SecretRef.parse(value))
    return expand(value, client=client)


def expand(text: str, *, client: VaultClient | None = None) -> str:
    """Replace every ``${vault://MOUNT/PATH#KEY}`` in ``text`` with its value."""
    if "${vault://" not in text:
        return text
    c = client or default_client()
    return _EMBEDDED.sub(lambda m: c.read(SecretRef.parse(m.group(1))), text)


class VaultReferences(PydanticBaseSettingsSource):
    """A settings source that resolves ``vault://`` references found in the values of the other sources.

    Use it in a settings class::

        @classmethod
        def settings_customise_sources(cls, settings_cls, init, env, dotenv, file_secret):
            return (VaultReferences(settings_cls, init, env, dotenv, file_secret),)

    or inherit :class:`VaultResolvingSettings`, which does exactly that.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], *sources: PydanticBaseSettingsSource, client: VaultClient | None = None
    ) -> None:
        super().__init__(settings_cls)
        self.sources, self.vault = sources, client

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False  # everything happens in __call__

    def __call__(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for source in reversed(self.sources):  # earlier sources win, as in pydantic-settings
            merged.update(source())
        return {k: self._resolve(v) for k, v in merged.items()}

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, SecretStr):
            raw = value.get_secret_value()
            return SecretStr(resolve(raw, client=self.vault)) if is_reference(raw) else value
        if is_reference(value):
            return resolve(value, client=self.vault)
        if isinstance(value, dict):
            return {k: self._resolve(v) for k, v in value.items()}
        return value


class VaultResolvingSettings(BaseSettings):
    """Base for settings classes whose values may be ``vault://`` references."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (VaultReferences(settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings),)

"""Prompt/response logging, opt-in per model: PII redacted first, then encrypted (Vault transit, or a KMS data key
with AES-256-GCM), then written in batches to the artifact store under ``prompt-logs/MODEL/DAY/``, from where
:mod:`slipway.governance.retention` deletes them after the retention period.

    logger = PromptLogger.from_settings()                  # SLIPWAY_PROMPTLOG_MODELS=demo,other
    logger.log(model="demo", version=3, request_id=rid, prompt=messages, response=text)
    logger.flush()                                         # also when the batch is full

Only redacted text is ever encrypted, and only ciphertext is ever stored or logged.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import threading
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from slipway.serve.errors import ServeError

if TYPE_CHECKING:
    from slipway.artifacts import ArtifactRef, ArtifactStore
    from slipway.secrets import VaultClient

FORMAT = "slipway-promptlog/1"

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])"  # not inside a longer number
    r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}"
    r"(?![ .-]?\d)(?!\w)"
)


# Where batches land in the artifact store; retention (slipway.governance.retention) purges under it.
PROMPT_LOG_PREFIX = "prompt-logs"


class PromptLogError(ServeError):
    """A prompt log cannot be written or read (no key configured, wrong key, tampered object)."""


class PromptLogSettings(BaseSettings):
    """Prompt/response logging (env prefix ``SLIPWAY_PROMPTLOG_``); off unless a model is listed."""

    model_config = SettingsConfigDict(env_prefix="SLIPWAY_PROMPTLOG_", env_file=".env", extra="ignore")

    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated models whose prompts are logged. Default none (off)."
    )
    encryption: Literal["vault", "kms"] = Field(
        default="vault", description="vault: Vault transit; kms: a KMS data key per batch. Default vault."
    )
    transit_key: str = Field(
        default="slipway-prompt-logs", description="Transit key name. Default slipway-prompt-logs."
    )
    transit_mount: str = Field(default="transit", description="Mount of the transit engine. Default transit.")
    kms_key_id: str | None = Field(default=None, description="KMS key id/ARN for encryption=kms. No default.")
    batch_size: int = Field(
        default=100, ge=1, le=10_000, description="Records per stored object, 1-10000. Default 100."
    )

    @field_validator("models", mode="before")
    @classmethod
    def models_are_comma_separated(cls, value: Any) -> Any:
        return [m.strip() for m in value.split(",") if m.strip()] if isinstance(value, str) else value


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def redact(text: str) -> str:
    """``text`` with e-mail addresses, card numbers (Luhn-valid) and phone numbers replaced by placeholders."""
    text = _EMAIL.sub("[EMAIL]", text)

    def card(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        return "[CARD]" if _luhn(digits) else m.group(0)

    text = _CARD.sub(card, text)
    return _PHONE.sub("[PHONE]", text)


def redact_value(value: Any) -> Any:
    """Redact every string inside ``value`` (a prompt string, or chat messages)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


class Encryptor(Protocol):
    def seal(self, plaintext: bytes) -> dict[str, Any]: ...

    def open(self, envelope: dict[str, Any]) -> bytes: ...


class TransitEncryptor:
    """Vault transit: Vault encrypts; the key never leaves Vault."""

    def __init__(self, vault: VaultClient, key: str, *, mount: str = "transit") -> None:
        self.vault, self.key, self.mount = vault, key, mount

    def seal(self, plaintext: bytes) -> dict[str, Any]:
        return {"alg": "vault-transit", "key": self.key, "ciphertext": self.vault.encrypt(self.key, plaintext,
                                                                                         mount=self.mount)}  # fmt: skip

    def open(self, envelope: dict[str, Any]) -> bytes:
        return self.vault.decrypt(envelope["key"], envelope["ciphertext"], mount=self.mount)


class KmsEncryptor:
    """Envelope encryption: a fresh KMS data key per batch, AES-256-GCM here, only the wrapped key stored."""

    def __init__(self, kms: Any, key_id: str) -> None:
        self.kms, self.key_id = kms, key_id

    def seal(self, plaintext: bytes) -> dict[str, Any]:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        dk = self.kms.generate_data_key(KeyId=self.key_id, KeySpec="AES_256")
        nonce = os.urandom(12)
        ct = AESGCM(dk["Plaintext"]).encrypt(nonce, plaintext, FORMAT.encode())
        return {
            "alg": "kms+aes-256-gcm",
            "key_id": dk.get("KeyId", self.key_id),
            "wrapped_key": base64.b64encode(dk["CiphertextBlob"]).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(ct).decode(),
        }

    def open(self, envelope: dict[str, Any]) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = self.kms.decrypt(CiphertextBlob=base64.b64decode(envelope["wrapped_key"]))["Plaintext"]
        try:
            return AESGCM(key).decrypt(
                base64.b64decode(envelope["nonce"]), base64.b64decode(envelope["ciphertext"]), FORMAT.encode()
            )
        except InvalidTag as e:
            raise PromptLogError("prompt log does not decrypt: it was altered or sealed with another key") from e


class PromptLogger:
    """Buffers redacted records of opted-in models and writes them encrypted, one object per model and batch."""

    def __init__(
        self, *, store: ArtifactStore, encryptor: Encryptor, models: Iterable[str], batch_size: int = 100
    ) -> None:
        self.store, self.encryptor, self.models = store, encryptor, frozenset(models)
        self.batch_size = batch_size
        self._buf: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: PromptLogSettings | None = None, *, store: ArtifactStore | None = None
    ) -> PromptLogger:
        """A logger from ``settings`` (default ``SLIPWAY_PROMPTLOG_*``); Vault or KMS access from the environment."""
        from slipway.artifacts import open_store

        st = settings or PromptLogSettings()
        if st.encryption == "kms":
            if not st.kms_key_id:
                raise PromptLogError("SLIPWAY_PROMPTLOG_KMS_KEY_ID is required with encryption=kms")
            import boto3

            from slipway.artifacts.s3 import S3Settings

            s3 = S3Settings()
            enc: Encryptor = KmsEncryptor(boto3.client("kms", region_name=s3.region), st.kms_key_id)
        else:
            from slipway.secrets import default_client

            enc = TransitEncryptor(default_client(), st.transit_key, mount=st.transit_mount)
        return cls(store=store or open_store(), encryptor=enc, models=st.models, batch_size=st.batch_size)

    def enabled(self, model: str) -> bool:
        return model in self.models

    def log(
        self,
        *,
        model: str,
        version: int | None,
        request_id: str,
        prompt: Any,
        response: Any,
        key: str | None = None,
        ts: dt.datetime | None = None,
    ) -> bool:
        """Buffer one exchange (redacted) if ``model`` opted in; False when it did not."""
        if not self.enabled(model):
            return False
        rec = {
            "ts": (ts or dt.datetime.now(dt.UTC)).isoformat(),
            "model": model,
            "version": version,
            "request_id": request_id,
            "key": key,
            "prompt": redact_value(prompt),
            "response": redact_value(response),
        }
        with self._lock:
            self._buf.setdefault(model, []).append(rec)
            full = len(self._buf[model]) >= self.batch_size
        if full:
            self.flush(model)
        return True

    def flush(self, model: str | None = None) -> list[ArtifactRef]:
        """Seal and store what is buffered (for ``model``, or all); the stored objects."""
        with self._lock:
            names = [model] if model is not None else list(self._buf)
            batches = {m: self._buf.pop(m) for m in names if self._buf.get(m)}
        refs = []
        for m, records in batches.items():
            first = dt.datetime.fromisoformat(records[0]["ts"])
            body = json.dumps(records, separators=(",", ":")).encode()
            obj = {"format": FORMAT, "model": m, "count": len(records), "envelope": self.encryptor.seal(body)}
            key = f"{PROMPT_LOG_PREFIX}/{m}/{first:%Y-%m-%d}/{first:%H%M%S%f}-{uuid.uuid4().hex[:8]}.json"
            refs.append(self.store.put(key, json.dumps(obj).encode()))
        return refs


def read(store: ArtifactStore, key: str, encryptor: Encryptor) -> list[dict[str, Any]]:
    """The records of one stored prompt-log object (checksum verified, decrypted)."""
    obj = json.loads(store.read_bytes(key))
    if obj.get("format") != FORMAT:
        raise PromptLogError(f"{key}: not a prompt log ({obj.get('format')!r})")
    return list(json.loads(encryptor.open(obj["envelope"])))

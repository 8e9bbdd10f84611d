"""The ``Provider`` kind: a hosted model reached over the network instead of weights served here.

A provider version is registered like any version of a model (its lineage says ``provider``) and served through
the same gateway: keys, limits, budgets, usage, windows, shadows and weights. Two upstream APIs:

- ``openai``: any OpenAI-compatible chat/completions endpoint — OpenAI, Azure OpenAI's v1 API, Anthropic's OpenAI
  SDK compatibility, Vertex AI's OpenAI-compatible endpoint, Bedrock's ``bedrock-mantle`` Chat Completions, vLLM,
  TGI, Ollama or another slipway gateway (docs/providers.md lists each one's base URL and auth header);
- ``bedrock``: Amazon Bedrock's Converse API through boto3 (Claude, Nova and Llama on Bedrock have no Chat
  Completions there), credentials from the usual AWS chain or ``vault://`` references.

Example::

    apiVersion: slipway/v1
    kind: Provider
    name: openai-gpt-4o-mini
    api: openai
    base_url: https://api.openai.com/v1
    model: gpt-4o-mini
    api_key: ${OPENAI_API_KEY}        # an environment variable, or vault://secret/data/openai#key
    price: {prompt_per_1k: 0.00015, completion_per_1k: 0.0006}
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from slipway.policies.kinds import Document, Strict, register_kind

_SECRET_REF = re.compile(r"^(\$\{[A-Za-z_][A-Za-z0-9_]*\}|vault://\S+)$")


class ProviderPrice(Strict):
    """What the provider bills per token (cost reports and budgets price its usage rows with it)."""

    prompt_per_1k: float = Field(ge=0, le=1000, description="US dollars per 1000 prompt tokens, 0-1000.")
    completion_per_1k: float = Field(ge=0, le=1000, description="US dollars per 1000 completion tokens, 0-1000.")


class ProviderTimeouts(Strict):
    connect_s: float = Field(
        default=5.0, gt=0, le=60, description="Connecting to the upstream. Default 5 s, at most 60."
    )
    first_token_s: float = Field(
        default=30.0, gt=0, le=600, description="Until the upstream's first token or answer. Default 30 s, at most 600."
    )
    total_s: float = Field(default=120.0, gt=0, le=3600, description="The whole request. Default 120 s, at most 3600.")

    @model_validator(mode="after")
    def total_covers_first_token(self) -> ProviderTimeouts:
        if self.total_s < self.first_token_s:
            raise ValueError(f"total_s ({self.total_s:g}) must be at least first_token_s ({self.first_token_s:g})")
        return self


class ProviderLimits(Strict):
    """Bounds slipway enforces before the upstream is called (the upstream keeps its own)."""

    max_tokens: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Most completion tokens a request may ask for. Default none."
    )
    max_prompt_bytes: int | None = Field(
        default=None, ge=1, le=100_000_000, description="Most UTF-8 bytes of prompt or messages. Default none."
    )


@register_kind
class Provider(Document):
    kind: Literal["Provider"] = "Provider"
    api: Literal["openai", "bedrock"] = Field(
        description="The upstream's API: `openai` (an OpenAI-compatible chat/completions endpoint) or `bedrock` "
        "(Amazon Bedrock's Converse API through boto3)."
    )
    model: str = Field(min_length=1, max_length=300, description="The upstream's name for the model.")
    base_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="The API's base URL, ending before /chat/completions (api: openai; required there).",
    )
    api_key: str | None = Field(
        default=None,
        description="The bearer token, as a reference only: `${ENV_VAR}` or `vault://path#key`, never the key "
        "itself (api: openai; default none: no Authorization header, e.g. a local vLLM).",
    )
    auth_header: str = Field(
        default="Authorization",
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="The header the key goes in: `Authorization` (sent as `Bearer KEY`) or another header name "
        "sent as the bare key, e.g. Azure OpenAI's `api-key`. Default Authorization.",
    )
    region: str | None = Field(
        default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d$", description="AWS region (api: bedrock; required there)."
    )
    aws_access_key_id: str | None = Field(
        default=None, description="`${ENV_VAR}` or `vault://` reference (api: bedrock). Default: the AWS chain."
    )
    aws_secret_access_key: str | None = Field(
        default=None, description="`${ENV_VAR}` or `vault://` reference (api: bedrock). Default: the AWS chain."
    )
    timeouts: ProviderTimeouts = Field(default_factory=ProviderTimeouts, description="Upstream timeouts.")
    limits: ProviderLimits = Field(default_factory=ProviderLimits, description="Request bounds enforced here.")
    price: ProviderPrice | None = Field(default=None, description="Per-token prices. Default none: spend not priced.")

    @model_validator(mode="after")
    def api_settings_are_complete(self) -> Provider:
        if self.api == "openai":
            if self.base_url is None:
                raise ValueError("api openai needs base_url (e.g. https://api.openai.com/v1)")
            if self.region or self.aws_access_key_id or self.aws_secret_access_key:
                raise ValueError("region and aws_* keys are for api bedrock")
        else:
            if self.region is None:
                raise ValueError("api bedrock needs region (e.g. us-east-1)")
            if self.base_url or self.api_key:
                raise ValueError("base_url and api_key are for api openai; bedrock signs with AWS credentials")
            if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
                raise ValueError("aws_access_key_id and aws_secret_access_key go together (or neither: the AWS chain)")
        return self

    @field_validator("api_key", "aws_access_key_id", "aws_secret_access_key")
    @classmethod
    def secrets_are_references(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not _SECRET_REF.match(value):
            raise ValueError(
                f"{info.field_name} must be a reference (`${{ENV_VAR}}` or `vault://path#key`), not a secret"
            )
        return value


#: The key of a provider version's ``params`` in the registry holding its Provider document (references only).
PARAMS_KEY = "provider"


def version_params(doc: Provider) -> dict[str, Any]:
    """The ``params`` a provider version is registered with: ``source: provider`` (its lineage) and the Provider
    document as written — secrets stay ``${ENV}`` / ``vault://`` references, never resolved values."""
    return {"source": "provider", PARAMS_KEY: doc.model_dump(mode="json", by_alias=True, exclude_none=True)}


def from_params(params: dict[str, Any] | None) -> Provider | None:
    """The Provider document of a version registered with :func:`version_params`, or None for a version with
    weights of its own."""
    doc = (params or {}).get(PARAMS_KEY)
    if not isinstance(doc, dict) or (params or {}).get("source") != "provider":
        return None
    return Provider.model_validate(doc)


_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def resolve_secret(ref: str | None) -> str | None:
    """The value a ``${ENV_VAR}`` or ``vault://`` reference points to (None for None); :class:`LookupError` naming
    the variable when it is not set. The value is never logged."""
    if ref is None:
        return None
    m = _ENV_REF.match(ref)
    if m:
        value = os.environ.get(m.group(1))
        if value is None:
            raise LookupError(f"the provider's key variable {m.group(1)} is not set")
        return value
    from slipway import secrets

    return secrets.resolve(ref)

"""``register_provider``: a hosted model (a ``Provider`` document) registered as a version of a model, like any
version, so that it can hold an alias, be served through the gateway and be canaried against a fine-tune.

A provider version has no artifact. Its lineage says ``provider``: ``params`` hold ``source: provider`` and the
Provider document as written — secrets only as ``${ENV}`` or ``vault://`` references, never resolved values. Its
fingerprint is the document's sha256, so registering the same document again returns the same version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from pydantic import Field

from slipway.flows.errors import FlowError
from slipway.flows.steptypes import StepContext, step_type
from slipway.policies.kinds import NAME_PATTERN, DocRef, Strict
from slipway.policies.provider import Provider, version_params


class RegisterProviderInput(Strict):
    provider: Annotated[str, DocRef("Provider")] = Field(description="Name of the Provider document.")
    model: str | None = Field(
        default=None, pattern=NAME_PATTERN, description="Model to register it under. Default: the pipeline's model."
    )
    alias: str | None = Field(
        default=None,
        description="An alias (e.g. production) pointed at the version when the model has no such alias yet; an "
        "existing alias is left where it is. Default none.",
    )


class RegisterProviderOutput(Strict):
    version: str = Field(description="MODEL:VERSION of the provider version.")
    reused: bool = Field(description="True when the same document was registered before (that version returned).")
    alias_set: bool = Field(description="True when the alias was created pointing at it.")


@step_type("register_provider")
def register_provider(ctx: StepContext, inp: RegisterProviderInput) -> RegisterProviderOutput:
    """Register a Provider document as a version of a model (once per document; lineage ``provider``)."""
    model = inp.model or ctx.model
    if model is None:
        raise FlowError("register_provider needs a model: give with.model or the pipeline's model")
    doc = ctx.documents.get("Provider", inp.provider)
    with ctx.session() as s:
        ref, reused, alias_set = register(s, doc, model=model, alias=inp.alias)
    ctx.logger.info("%s: provider %s (%s)", ref, doc.name, "already registered" if reused else "registered")
    return RegisterProviderOutput(version=ref, reused=reused, alias_set=alias_set)


def fingerprint(doc: Provider) -> str:
    """The identity of a provider version: the sha256 of its document (references, never secrets)."""
    body = json.dumps(version_params(doc), sort_keys=True, separators=(",", ":"))
    return "provider:" + hashlib.sha256(body.encode()).hexdigest()[:64]


def register(
    s: Any, doc: Provider, *, model: str, alias: str | None = None, description: str = ""
) -> tuple[str, bool, bool]:
    """Register ``doc`` as the next version of ``model`` (created when missing) in session ``s`` (the caller
    owns the transaction); the same document registered before returns that version. Returns ``(MODEL:VERSION, reused,
    alias_set)``."""
    from slipway.registry import catalog

    fp = fingerprint(doc)
    catalog.ensure_model(s, model)
    mv = catalog.find_by_fingerprint(s, model, fp)
    reused = mv is not None
    if mv is None:
        mv = catalog.create_version(
            s,
            model=model,
            params=version_params(doc),
            fingerprint=fp,
            description=description or f"provider {doc.name}: {doc.api} {doc.model}",
        )
    alias_set = False
    if alias and catalog.find_alias(s, model, alias) is None:
        catalog.set_alias(s, model=model, alias=alias, version=mv.version, expected=None)
        alias_set = True
    return mv.ref, reused, alias_set

"""Model cards: lineage, evaluations, gate decisions and intended use of a version, rendered to Markdown, written to
the artifact store and registered as the version's ``model_card`` artifact.

Call :func:`write_model_card` when a version is registered (the compliance rule ``model_card`` looks for it)::

    ref = write_model_card(reg, "demo:3", intended_use="Internal support answers; not for medical advice.")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from slipway.artifacts import ArtifactRef, ArtifactStore
    from slipway.registry import Registry
    from slipway.registry.models import ModelVersion

KIND = "model_card"


def render(s: Session, mv: ModelVersion, *, intended_use: str | None = None) -> str:
    """The Markdown card of ``mv`` from what the registry knows about it."""
    from slipway.registry import evals
    from slipway.registry.models import Dataset, EvalRun, GateDecision

    m = mv.model
    use = intended_use or (m.tags or {}).get("intended_use") or m.description or "Not stated."
    lines = [f"# Model card: {mv.ref}", "", f"- **Status:** {mv.status}", f"- **Licence:** {m.license or 'unknown'}"]
    lines += [
        f"- **Owner:** {m.owner or 'unknown'}",
        f"- **Created:** {mv.created_at:%Y-%m-%d %H:%M} UTC by {mv.created_by}",
    ]
    lines += ["", "## Intended use", "", use, "", "## Lineage", ""]
    chain, v = [], mv.base_version
    while v is not None and len(chain) < 20:
        chain.append(f"{v.ref} (licence {v.model.license or 'unknown'})")
        v = v.base_version
    lines.append(f"- **Base:** {' ← '.join(chain) if chain else 'none (a base model)'}")
    if mv.dataset_digest:
        ds = s.scalars(select(Dataset).where(Dataset.digest == mv.dataset_digest)).all()
        for d in ds or []:
            lines.append(f"- **Dataset:** {d.name}@{d.digest[:12]} — {d.rows or '?'} rows, validation "
                         f"{d.validation_status or 'not run'} ({d.validation_suite or '-'})")  # fmt: skip
        if not ds:
            lines.append(f"- **Dataset digest:** {mv.dataset_digest}")
    lines.append(f"- **Pipeline run:** {mv.pipeline_run_id or '-'}; code revision {mv.code_revision or '-'}")
    if mv.params:
        lines.append("- **Parameters:** " + ", ".join(f"`{k}={v}`" for k, v in sorted(mv.params.items())))
    lines += ["", "## Evaluations", ""]
    runs = s.scalars(select(EvalRun).where(EvalRun.version_id == mv.id).order_by(EvalRun.id)).all()
    if runs:
        lines += ["| suite | role | examples | metrics |", "|---|---|---|---|"]
        for r in runs:
            metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted((r.aggregates or {}).items()))
            lines.append(f"| {r.suite} | {r.role} | {r.n_examples} | {metrics} |")
    else:
        lines.append("No evaluations recorded.")
    lines += ["", "## Gate decisions", ""]
    gates = s.scalars(select(GateDecision).where(GateDecision.version_id == mv.id).order_by(GateDecision.id)).all()
    lines += [f"- {g.created_at:%Y-%m-%d} {g.policy}: **{g.outcome}**" for g in gates] or ["None."]
    latest = evals.latest_gate_decision(s, mv)
    if latest is not None and latest.reasons:
        lines += ["", "Reasons of the latest decision:", ""]
        lines += [f"- {r.get('reason') or r}" if isinstance(r, dict) else f"- {r}" for r in latest.reasons[:20]]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        v = v.get("mean", v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_model_card(
    reg: Registry, ref: str, *, store: ArtifactStore | None = None, intended_use: str | None = None
) -> ArtifactRef:
    """Render the card of ``ref`` (``MODEL:VERSION``), store it and register it; the same content is stored once.

    Raises the registry's :class:`NotFound` for an unknown version.
    """
    from slipway.artifacts import open_store, sha256_bytes
    from slipway.registry import catalog
    from slipway.registry.models import Artifact

    store = store or open_store()
    with reg.session() as s:
        mv = catalog.resolve(s, ref)
        body = render(s, mv, intended_use=intended_use).encode()
        key = f"model-cards/{mv.model.name}/{mv.version}/model-card-{sha256_bytes(body)[:12]}.md"
        written = store.put(key, body)
        if s.scalar(select(Artifact.id).where(Artifact.uri == written.uri)) is None:
            catalog.add_artifact(s, mv, catalog.ArtifactSpec(KIND, written.uri, written.sha256, written.size))
    return written

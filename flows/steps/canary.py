"""The ``canary``, ``promote`` and ``rollback`` steps: roll a candidate out beside the champion on Ray Serve,
move ``production`` when it holds, or put the previous version back.

One concept, three sides: the plan is a document (:mod:`slipway.policies.canaryplan`), the controller that walks
it and the promotion it ends in are serving's (:mod:`slipway.serve.canary`: plain Python, no Prefect), and
this module is the step that runs them inside a pipeline, with the lease, the synthetic traffic and the undo.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Annotated, Any

from pydantic import Field

from slipway.flows.steptypes import StepContext, step_type
from slipway.policies.kinds import DocRef, Strict
from slipway.policies.servingconfig import FaultInjection

log = logging.getLogger(__name__)


class TrafficSpec(Strict):
    rps: float = Field(default=20.0, gt=0, le=500, description="Requests per second sent through the gateway.")
    suite: Annotated[str | None, DocRef("EvalSuite")] = Field(
        default=None, description="Take prompts from this EvalSuite's dataset. Default: a fixed prompt."
    )
    max_tokens: int = Field(default=16, ge=1, le=512, description="max_tokens of each request. Default 16.")


class CanaryInput(Strict):
    plan: Annotated[str, DocRef("CanaryPlan")] = Field(description="CanaryPlan to walk.")
    candidate: str = Field(description="Version to roll out: MODEL:VERSION.")
    serving: Annotated[str | None, DocRef("ServingConfig")] = Field(
        default=None, description="ServingConfig of the model. Default: ServingConfig.for_model(MODEL)."
    )
    traffic: TrafficSpec | None = Field(
        default=None, description="Synthetic traffic during the rollout (demos and tests). Default none."
    )
    fault: FaultInjection | None = Field(
        default=None, description="Chaos drill: make the candidate fail on purpose to watch the rollback. Default none."
    )


class CanaryOutput(Strict):
    outcome: str = Field(description="completed (the step fails when the canary is rolled back).")
    candidate: str
    champion: str
    base_url: str
    worst_case_rollback_s: float
    timeline: list[dict[str, Any]]
    traffic: dict[str, int] = Field(default_factory=dict, description="Synthetic requests sent / failed.")
    decided_by: str | None = Field(
        default=None, description="What decided: sequential (the plan's sequential analysis) or plan (every step)."
    )
    analysis: int | None = Field(
        default=None, description="The canary analysis id (`slipway canary explain ID`), with analysis.sequential."
    )


def _serving_config(ctx: StepContext, name: str | None, model: str) -> Any:
    from slipway.policies.servingconfig import ServingConfig

    if name is not None:
        return ctx.documents.get("ServingConfig", name)
    found = [d.doc for d in ctx.documents.of_kind("ServingConfig") if d.doc.model == model]
    return found[0] if found else ServingConfig.for_model(model)


def _quality_probe(ctx: StepContext, plan: Any) -> Any:
    """Online evaluation for the plan's ``quality`` metrics (None when it has none)."""
    from slipway.serve.canary.quality import QualityProbe

    names = {str(m.suite) for m in plan.analysis.metrics if m.name == "quality" and m.suite is not None}
    if not names:
        return None
    return QualityProbe(plan, {n: ctx.documents.get("EvalSuite", n) for n in names})


def _undo_canary(ctx: StepContext, outputs: dict[str, Any]) -> str:
    """A later step failed after the canary succeeded (say ``promote``): drive serving back to the last committed
    state — ``production`` at 100 %, the unpromoted candidate drained and removed. A promoted candidate is the
    committed state and stays."""
    from slipway.serve import control, local
    from slipway.serve.canary import promotion

    model = str(outputs["candidate"]).split(":")[0]
    local.connect(start=False)
    rep = promotion.reconcile(ctx.registry, control, model=model)
    return "; ".join(rep.actions) or f"{model} already at its committed state"


@step_type("canary", undo=_undo_canary)
def canary(ctx: StepContext, inp: CanaryInput) -> CanaryOutput:
    """Roll the candidate out under a CanaryPlan; roll back automatically (the step fails) when it misbehaves."""
    from slipway.registry import catalog, leases
    from slipway.serve import control, local
    from slipway.serve.canary import promotion
    from slipway.serve.canary.controller import LEASE_TTL, Controller, RolledBack

    plan = ctx.documents.get("CanaryPlan", inp.plan)
    reg = ctx.registry
    with reg.session() as s:
        cand = catalog.resolve(s, inp.candidate)
        model, number = cand.model.name, cand.version
        champ = catalog.find_alias(s, model, "production")
        if champ is None:
            raise promotion.PromotionError(
                f"{model} has no production version to canary against; "
                f"promote a first version with `slipway alias set {model} production N`"
            )
        champion = champ.version.version
    cfg = _serving_config(ctx, inp.serving, model)
    if champion == number:  # a re-run after a completed promotion: nothing to roll out, make sure it serves
        local.connect(start=True)
        promotion.reconcile(reg, control, model=model, config=cfg)
        up = local.up(reg, models=[model], configs={model: cfg})
        return CanaryOutput(
            outcome="already-production",
            candidate=f"{model}:{number}",
            champion=f"{model}:{number}",
            base_url=up["base_url"],
            worst_case_rollback_s=plan.worst_case_rollback_s,
            timeline=[],
        )
    holder = promotion.holder_id(ctx.run_id)
    local.connect(start=True)
    promotion.reconcile(reg, control, model=model, config=cfg)  # a dead earlier promotion is cleaned up first
    with ctx.session() as s:
        leases.acquire(s, model=model, holder=holder, run_id=ctx.run_id, ttl=LEASE_TTL)
    up = local.up(reg, models=[model], configs={model: cfg})
    base = up["base_url"]
    traffic = _start_traffic(ctx, inp.traffic, base, model) if inp.traffic else None
    try:
        cand_cfg = cfg.model_copy(update={"fault_injection": inp.fault}) if inp.fault else cfg
        result = Controller(
            reg,
            plan,
            model=model,
            candidate=number,
            champion=champion,
            holder=holder,
            control=control,
            serving_config=cand_cfg,
            run_id=ctx.run_id,
            quality_probe=_quality_probe(ctx, plan),
        ).run()
    except BaseException:
        _release(reg, model, holder)
        raise
    finally:
        sent = traffic.stop() if traffic else []
    counts = {"sent": len(sent), "failed": sum(1 for o in sent if o.status == 0 or o.status >= 500)}
    timeline = [{"t": e.t, "event": e.event, **e.detail} for e in result.timeline]
    if result.analysis_id is not None:
        _analysis_artifacts(ctx, result.analysis_id)
    if result.outcome != "completed":
        _release(reg, model, holder)
        raise RolledBack(
            f"canary of {result.candidate} rolled back after {result.rollback_at:.2f} s: "
            f"{result.reason} (synthetic traffic: {counts['failed']} of {counts['sent']} failed)"
        )
    return CanaryOutput(
        outcome=result.outcome,
        candidate=result.candidate,
        champion=result.champion,
        base_url=base,
        worst_case_rollback_s=plan.worst_case_rollback_s,
        timeline=timeline,
        traffic=counts,
        decided_by=result.decided_by,
        analysis=result.analysis_id,
    )


def _analysis_artifacts(ctx: StepContext, analysis_id: int) -> None:
    """The canary analysis on the Prefect run: a table (per metric: estimate, confidence sequence, samples,
    decision) and a PNG chart of the sequences, stored in the artifact store and shown as an image artifact."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    try:
        from prefect.artifacts import create_image_artifact, create_table_artifact

        from slipway.artifacts import open_store
        from slipway.registry import canaries
        from slipway.serve.canary.chart import sequence_png

        with ctx.registry.session() as s:
            a = canaries.get_analysis(s, str(analysis_id))
            metrics, trajectory = list(a.metrics), dict(a.trajectory)
            title = f"canary analysis {a.id}: v{a.candidate} vs v{a.champion}, {a.status} by {a.decided_by}"
        table = [
            {
                "metric": m["metric"],
                "estimate": round(m["estimate"], 5),
                "low": None if m["low"] is None else round(m["low"], 5),
                "high": None if m["high"] is None else round(m["high"], 5),
                "samples": m["samples"],
                "min_difference": m["min_difference"],
                "decision": m["decision"],
            }
            for m in metrics
        ]
        create_table_artifact(table, key=f"canary-analysis-{analysis_id}", description=title)
        ref = open_store().put(f"reports/canary/{analysis_id}/sequence.png", sequence_png(trajectory, metrics))
        create_image_artifact(image_url=ref.uri, key=f"canary-sequence-{analysis_id}", description=title)
    except Exception as e:  # an artifact is a nicety; the registry holds the record
        ctx.logger.warning("could not publish the canary analysis artifacts: %s", e)


def _release(reg: Any, model: str, holder: str) -> None:
    from slipway.registry import leases

    with reg.session() as s:
        leases.release(s, model=model, holder=holder)


def _start_traffic(ctx: StepContext, spec: TrafficSpec, base: str, model: str) -> Any:
    from slipway.registry import keys
    from slipway.registry.types import utcnow
    from slipway.serve.canary.traffic import Traffic

    prompts = ['Text: Ana moved to Lisbon last year to work as a "pilot" at the "garage".\nJSON:']
    if spec.suite is not None:
        from slipway.evaluation.suite import load_examples

        examples, _ = load_examples(ctx.documents.get("EvalSuite", spec.suite), limit=200)
        prompts = [e.prompt for e in examples] or prompts
    with ctx.session() as s:
        name = f"canary-traffic-{ctx.run_id[:8]}-{uuid.uuid4().hex[:6]}"
        _key, secret = keys.create_key(s, name=name, models=[model], expires_at=utcnow() + dt.timedelta(hours=1))
    return Traffic(f"{base}/v1", secret, model, prompts, rps=spec.rps, max_tokens=spec.max_tokens).start()


class PromoteInput(Strict):
    candidate: str = Field(description="Version to make production: MODEL:VERSION (usually the canary's).")
    approval: int | None = Field(default=None, description="Approval id, when production is protected.")
    role: str | None = Field(default=None, description="Role, when production is protected.")
    drain_timeout_s: float = Field(default=30, ge=0, description="Wait for the old champion's requests. Default 30.")
    bake_s: float = Field(
        default=30,
        ge=0,
        le=86_400,
        description="Keep the old champion deployed (weight 0) this long after the move, and put production back on "
        "it if the new version fails meanwhile (like Argo Rollouts' scaleDownDelaySeconds). Default 30; 0 retires "
        "it at once.",
    )
    bake_max_error_rate: float = Field(
        default=0.05, ge=0, le=1, description="Error rate over at least 5 requests that fails the bake. Default 0.05."
    )


class PromoteOutput(Strict):
    production: str
    previous: str | None


@step_type("promote")
def promote(ctx: StepContext, inp: PromoteInput) -> PromoteOutput:
    """Compare-and-set ``production`` to the candidate under the promotion lease; retire the old champion."""
    from slipway.registry import catalog
    from slipway.serve import local
    from slipway.serve.canary import promotion

    with ctx.session() as s:
        v = catalog.resolve(s, inp.candidate)
        model, number = v.model.name, v.version
    holder = promotion.holder_id(ctx.run_id)
    serving = local.control_if_running()  # registry-only promotion when nothing serves (the alias still moves)
    try:
        out = promotion.promote(
            ctx.registry,
            serving,
            model=model,
            candidate=number,
            holder=holder,
            approval_id=inp.approval,
            role=inp.role,
            run_id=ctx.run_id,
            drain_timeout_s=inp.drain_timeout_s,
            bake_s=inp.bake_s if serving is not None else 0.0,
            bake_check=_bake_check(serving, model, number, inp.bake_max_error_rate) if serving is not None else None,
        )
    finally:
        _release(ctx.registry, model, holder)
    prev = out["previous"]
    return PromoteOutput(production=f"{model}:{number}", previous=f"{model}:{prev}" if prev else None)


def _bake_check(control: Any, model: str, version: int, max_error_rate: float) -> Any:
    """What fails a bake: Serve has no running replica of the new production, or its error rate since the move
    (at least 5 requests) is above ``max_error_rate``."""
    import time

    since = time.monotonic()

    def check() -> str | None:
        ok, detail = control.version_health(model, version)
        if not ok:
            return f"unhealthy in Serve: {detail}"
        seconds = max(1.0, time.monotonic() - since)
        m = control.metrics(model, seconds=seconds).get(str(version)) or {}
        if m.get("requests", 0) >= 5 and m.get("error_rate", 0.0) > max_error_rate:
            return f"error_rate {m['error_rate']:.3g} above {max_error_rate:g} over {m['requests']} requests"
        return None

    return check


class RollbackInput(Strict):
    model: str = Field(description="Model whose production version is put back.")
    to: int | None = Field(default=None, description="Version to return to. Default: the previous production.")
    reason: str = Field(default="pipeline rollback step", description="Why, for the record.")


class RollbackOutput(Strict):
    production: str
    previous: str


@step_type("rollback")
def rollback(ctx: StepContext, inp: RollbackInput) -> RollbackOutput:
    """Put ``production`` back on the previous version (or ``to``), serving included."""
    from slipway.serve import control, local
    from slipway.serve.canary import promotion

    local.connect(start=False)
    out = promotion.rollback(ctx.registry, control, model=inp.model, to=inp.to, reason=inp.reason)
    return RollbackOutput(production=f"{inp.model}:{out['production']}", previous=f"{inp.model}:{out['previous']}")


class ReconcileInput(Strict):
    model: str | None = Field(default=None, description="Only this model. Default: every model.")
    registry_only: bool = Field(
        default=False, description="Fix the registry only (leases, candidates, runs); leave serving. Default false."
    )


class ReconcileOutput(Strict):
    actions: list[str] = Field(description="What was done, per model, in words (empty when all was consistent).")
    serving: bool = Field(description="Whether serving was reachable (else the registry alone was reconciled).")


@step_type("reconcile")
def reconcile(ctx: StepContext, inp: ReconcileInput) -> ReconcileOutput:
    """Drive every model (or one) to its last committed safe state: dead promotions aborted, their leases
    released, serving back on production at 100 %, orphaned candidate applications removed."""
    from slipway.registry import catalog
    from slipway.serve import local
    from slipway.serve.canary import promotion

    with ctx.session() as s:
        names = [catalog.get_model(s, inp.model).name] if inp.model else [m.name for m in catalog.list_models(s)]
    serving = None if inp.registry_only else local.control_if_running()
    actions = []
    for name in names:
        rep = promotion.reconcile(ctx.registry, serving, model=name)
        actions += [f"{name}: {a}" for a in rep.actions]
    return ReconcileOutput(actions=actions, serving=serving is not None)

"""The ``compliance_check`` step: run a ComplianceRules document, record findings diffed against the previous run,
and notify what is new or resolved. The checks and the findings' bookkeeping are
:mod:`slipway.governance.compliance`; this is the step that schedules them."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from slipway.flows.errors import FlowError
from slipway.flows.steptypes import StepContext, step_type
from slipway.policies.kinds import DocRef, Strict


class ComplianceBlocked(FlowError):
    """Blocking findings are open and the step was asked to fail on them (``fail_on_blocking``)."""


class ComplianceInput(Strict):
    rules: Annotated[str, DocRef("ComplianceRules")] = Field(
        default="default", description="ComplianceRules document to apply. Default default."
    )
    model: str | None = Field(default=None, description="Only this model (and the global rules). Default: all.")
    fail_on_blocking: bool = Field(
        default=False, description="Fail the step while a blocking finding is open. Default false."
    )


class ComplianceOutput(Strict):
    new: list[str] = Field(description="Findings opened by this run, one line each.")
    still_open: int
    resolved: list[str] = Field(description="Findings this run no longer saw, one line each.")
    blocking: list[str] = Field(description="Open findings that block promotions, one line each.")
    demoted: list[str] = Field(default_factory=list, description="Models moved off production by demote findings.")
    skipped: list[str] = Field(description="Rules that did not run, and why.")


@step_type("compliance_check")
def compliance_check(ctx: StepContext, inp: ComplianceInput) -> ComplianceOutput:
    """Apply compliance rules to the registry and record the findings."""
    from slipway.governance import compliance
    from slipway.serve import local

    rules = ctx.documents.get("ComplianceRules", inp.rules)
    report = compliance.run(ctx.registry, rules, docs=ctx.documents, model=inp.model)
    demoted: list[str] = []
    if any(f["action"] == "demote" for f in report.new):  # reach serving only when there is something to demote
        demoted = compliance.demote(ctx.registry, report, local.control_if_running())
    lines = compliance.summary_lines(report) + [f"demoted {d}" for d in demoted]
    if lines:
        from slipway.flows.steps.generic import NotifyInput, notify
        from slipway.secrets import resolve

        webhook = resolve(rules.webhook) if rules.webhook else None
        level = "error" if report.new and any(f["action"] == "block" for f in report.new) else "warning"
        notify(ctx, NotifyInput(message="compliance:\n" + "\n".join(lines), webhook=webhook, level=level))
    blocking = [f"{f['rule']} {f['subject']} ({f['severity']}): {f['message']}" for f in report.blocking]
    if blocking and inp.fail_on_blocking:
        raise ComplianceBlocked("blocking compliance findings are open: " + "; ".join(blocking))
    return ComplianceOutput(
        new=[f"{f['rule']} {f['subject']}: {f['message']}" for f in report.new],
        still_open=len(report.still_open),
        resolved=[f"{f['rule']} {f['subject']}" for f in report.resolved],
        blocking=blocking,
        skipped=[f"{r.rule}: {r.note}" for r in report.results if r.status in ("skipped", "error")],
        demoted=demoted,
    )

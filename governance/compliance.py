"""Running :class:`~slipway.policies.compliancerules.ComplianceRules` against the registry and recording the findings.

    report = run(reg, rules, docs=docs)               # every model with a production alias
    report = run(reg, rules, docs=docs, model="demo")  # one model (and the rules that concern no model)
    report.exit_code                                   # 1 while a blocking finding is open for the models

Each rule's check (in :mod:`slipway.governance.checks`) observes violations; the findings are then reconciled
with the previous run in one transaction: new ones are opened, those seen again stay open, those no longer seen
are resolved. A rule that is skipped or fails to run resolves nothing, so an outage never clears a finding.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slipway.governance.errors import GovernanceError

if TYPE_CHECKING:
    from slipway.artifacts import ArtifactStore
    from slipway.policies.compliancerules import ComplianceRules
    from slipway.registry import Registry
    from slipway.registry.findings import Observed

log = logging.getLogger("slipway.governance.compliance")

# Rules about the whole installation rather than one model.
GLOBAL_CHECKS = frozenset({"key_rotation", "retention", "audit_chain", "canary_rollback"})


class ComplianceError(GovernanceError):
    """The check cannot run as asked (unknown model, no rules)."""


@dataclass
class RuleResult:
    rule: str
    check: str
    status: str  # passed | violations | skipped | error
    note: str = ""
    observed: list[Observed] = field(default_factory=list)


@dataclass
class CheckReport:
    results: list[RuleResult]
    new: list[dict[str, Any]]
    still_open: list[dict[str, Any]]
    resolved: list[dict[str, Any]]
    blocking: list[dict[str, Any]]  # open findings with action block, for the models in scope

    @property
    def exit_code(self) -> int:
        return 1 if self.blocking else 0

    def as_json(self) -> dict[str, Any]:
        return {
            "rules": [
                {"rule": r.rule, "check": r.check, "status": r.status, "note": r.note, "violations": len(r.observed)}
                for r in self.results
            ],
            "new": self.new,
            "still_open": self.still_open,
            "resolved": self.resolved,
            "blocking": self.blocking,
        }


def finding_view(f: Any) -> dict[str, Any]:
    return {
        "id": f.id,
        "rule": f.rule_id,
        "subject": f.subject,
        "severity": f.severity,
        "action": f.action,
        "status": f.status,
        "message": f.message,
        "first_seen": f.first_seen,
    }


def models_in_scope(reg: Registry, rules: ComplianceRules, model: str | None) -> list[str]:
    """``model`` (checked to exist), else the rules' models, else every model with a production alias."""
    from sqlalchemy import select

    from slipway.registry import catalog
    from slipway.registry.errors import NotFound
    from slipway.registry.models import Alias, Model

    with reg.session() as s:
        if model is not None:
            try:
                catalog.get_model(s, model)
            except NotFound as e:
                raise ComplianceError(str(e)) from e
            return [model]
        if rules.models:
            return list(rules.models)
        q = select(Model.name).join(Alias, Alias.model_id == Model.id).where(Alias.name == "production")
        return sorted(set(s.scalars(q)))


def run(
    reg: Registry,
    rules: ComplianceRules,
    *,
    docs: Any = None,
    model: str | None = None,
    now: dt.datetime | None = None,
    store: ArtifactStore | None = None,
) -> CheckReport:
    """Run every rule, reconcile the findings, and report what is new, still open, resolved and blocking."""
    from slipway.governance import checks
    from slipway.registry import findings

    ctx = checks.RuleContext(reg, docs, models_in_scope(reg, rules, model), now or dt.datetime.now(dt.UTC), store)
    results: list[RuleResult] = []
    for rule in rules.rules:
        check = checks.CHECKS[rule.check]
        try:
            observed = check(ctx, rule)
        except checks.SkipRule as e:
            results.append(RuleResult(rule.id, rule.check, "skipped", str(e)))
            continue
        except Exception as e:  # one broken check must not hide the others' findings
            log.warning("compliance rule %s could not run: %s", rule.id, e)
            results.append(RuleResult(rule.id, rule.check, "error", f"{type(e).__name__}: {e}"))
            continue
        results.append(RuleResult(rule.id, rule.check, "violations" if observed else "passed", "", observed))
    ran = [r for r in results if r.status in ("passed", "violations")]
    glob = [r for r in ran if r.check in GLOBAL_CHECKS]
    per_model = [r for r in ran if r.check not in GLOBAL_CHECKS]
    with reg.session() as s:
        diffs = [
            findings.reconcile(s, [o for r in glob for o in r.observed], rules=[r.rule for r in glob]),
            findings.reconcile(
                s, [o for r in per_model for o in r.observed], rules=[r.rule for r in per_model], model=model
            ),
        ]
        new = [finding_view(f) for d in diffs for f in d.new]
        still = [finding_view(f) for d in diffs for f in d.still_open]
        resolved = [finding_view(f) for d in diffs for f in d.resolved]
        blocking = [finding_view(f) for m in ctx.models for f in findings.open_findings(s, model=m, action="block")]
    return CheckReport(results, new, still, resolved, blocking)


def demote(reg: Registry, report: CheckReport, control: Any = None) -> list[str]:
    """Act on the report's *new* findings whose action is ``demote``: move that model's ``production`` back to
    its previous version (serving included when ``control`` is given; registry only otherwise), once per model.
    Returns one line per model: what was done, or why it could not be."""
    from slipway.registry.models import ComplianceFinding, Model
    from slipway.serve.canary import promotion
    targets: dict[str, list[str]] = {}
    with reg.session() as s:
        for f in report.new:
            if f["action"] != "demote":
                continue
            row = s.get(ComplianceFinding, f["id"])
            name = s.get(Model, row.model_id).name if row is not None and row.model_id is not None else None
            if name is not None:
                targets.setdefault(name, []).append(f"{f['rule']}: {f['message']}")
    lines = []
    for model, why in targets.items():
        reason = "compliance demote: " + "; ".join(why)
        try:
            out = promotion.rollback(reg, control, model=model, reason=reason[:500])
            lines.append(f"{model}: production {out['previous']} -> {out['production']} ({reason})")
        except Exception as e:  # no earlier version, a promotion in progress, ...: say so, others still act
            lines.append(f"{model}: could not demote: {e}")
    return lines


def summary_lines(report: CheckReport) -> list[str]:
    """One line per new and resolved finding, for a notification."""
    lines = [f"NEW {f['severity']} [{f['action']}] {f['rule']} {f['subject']}: {f['message']}" for f in report.new]
    lines += [f"RESOLVED {f['rule']} {f['subject']}" for f in report.resolved]
    return lines

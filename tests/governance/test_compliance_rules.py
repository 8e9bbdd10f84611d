"""One test per shipped compliance rule: a planted violation is found with the rule's severity and action; a clean
registry passes; findings are diffed across runs; a blocking finding makes the next gate refuse."""

from __future__ import annotations

import datetime as dt
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from slipway import modelcard
from slipway.artifacts import open_store
from slipway.governance import compliance
from slipway.policies.compliancerules import ComplianceRules
from slipway.registry import catalog, evals, keys, usage
from slipway.registry.models import ApiKey, AuditEvent, Dataset, GateDecision, Model, ModelVersion

NOW = dt.datetime.now(dt.UTC)

RULES = ComplianceRules.model_validate(
    {
        "apiVersion": "slipway/v1",
        "kind": "ComplianceRules",
        "name": "test",
        "rules": [
            {"id": "gate-fresh", "check": "production_gate", "max_age_days": 30, "severity": "high", "action": "block"},
            {"id": "data-ok", "check": "datasets_validated", "severity": "critical", "action": "block"},
            {"id": "licence", "check": "base_license", "allow": ["apache-2.0", "mit"], "severity": "high",
             "action": "block"},
            {"id": "checksums", "check": "artifact_checksums", "severity": "critical", "action": "demote"},
            {"id": "sse-kms", "check": "s3_sse_kms", "severity": "high", "action": "notify"},
            {"id": "card", "check": "model_card", "severity": "low", "action": "notify"},
            {"id": "key-age", "check": "key_rotation", "max_age_days": 90, "severity": "medium", "action": "notify"},
            {"id": "retention", "check": "retention", "usage_days": 365, "prompt_log_days": 30, "severity": "medium",
             "action": "notify"},
            {"id": "audit", "check": "audit_chain", "severity": "critical", "action": "notify"},
            {"id": "rollback", "check": "canary_rollback", "max_s": 10, "severity": "medium", "action": "notify"},
        ],
    }
)  # fmt: skip


def clean(reg: Any, store: Any) -> None:
    """A registry that passes every rule: demo:1 (from base:1) in production, gated, validated, carded."""
    weights = store.put("models/demo/1/weights.bin", b"weights of demo v1")
    with reg.session() as s:
        catalog.create_model(s, name="base", license="apache-2.0")
        catalog.create_model(s, name="demo", license="proprietary")  # the base's licence is what counts
        base = catalog.create_version(s, model="base")
        ds = catalog.register_dataset(s, name="demo/train", digest="d" * 64, uri="file:///data/train.jsonl", rows=10)
        result = {"checks": [{"name": "notMatch(prompt, email)", "success": True}, {"name": "rows", "success": True}]}
        catalog.record_validation(s, ds, suite="chat-sft", passed=True, result=result)
        v = catalog.create_version(
            s, model="demo", base=base, dataset_digest="d" * 64,
            artifacts=[catalog.ArtifactSpec("weights", weights.uri, weights.sha256, weights.size)],
        )  # fmt: skip
        evals.record_gate_decision(
            s, version=v, champion=None, policy="demo-gate", outcome="passed", reasons=[], eval_run_ids=[]
        )
        catalog.set_alias(s, model="demo", alias="production", version=1)
        keys.create_key(s, name="fresh", team="a")
        usage.record_usage(s, [{"ts": NOW, "model": "demo", "version": 1, "status": 200}])
    modelcard.write_model_card(reg, "demo:1", store=store, intended_use="Tests.")


def run(reg: Any, store: Any, docs: Any = None, **kw: Any) -> compliance.CheckReport:
    return compliance.run(reg, RULES, docs=docs, store=store, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    return open_store((tmp_path / "artifacts").as_uri())


def test_a_clean_registry_passes_every_rule(registry, store):
    clean(registry, store)
    report = run(registry, store)
    status = {r.rule: r.status for r in report.results}
    assert status == {
        "gate-fresh": "passed", "data-ok": "passed", "licence": "passed", "checksums": "passed",
        "sse-kms": "skipped", "card": "passed", "key-age": "passed", "retention": "passed", "audit": "passed",
        "rollback": "skipped",
    }  # fmt: skip
    assert report.new == [] and report.blocking == [] and report.exit_code == 0
    notes = {r.rule: r.note for r in report.results if r.status == "skipped"}
    assert notes == {"sse-kms": "no s3:// artifacts in scope", "rollback": "no CanaryPlan documents are loaded"}


def _age_gate(s):
    s.execute(update(GateDecision).values(created_at=NOW - dt.timedelta(days=45)))


def _fail_pii(s):
    ds = s.query(Dataset).one()
    ds.validation_status = "failed"
    ds.validation_result = {"checks": [{"name": "notMatch(prompt, email)", "success": False}]}


def _bad_licence(s):
    s.execute(update(Model).where(Model.name == "base").values(license="cc-by-nc-4.0"))


def _tamper(s, store):
    store.put("models/demo/1/weights.bin", b"weights of demo v1, altered")


def _drop_card(s):
    mv = s.query(ModelVersion).filter_by(version=1).join(Model).filter(Model.name == "demo").one()
    for a in list(mv.artifacts):
        if a.kind == "model_card":
            s.delete(a)


def _old_key(s):
    keys.create_key(s, name="old-key", team="b")
    s.flush()
    s.execute(update(ApiKey).where(ApiKey.name == "old-key").values(created_at=NOW - dt.timedelta(days=120)))


def _old_usage(s):
    usage.record_usage(s, [{"ts": NOW - dt.timedelta(days=400), "model": "demo", "version": 1, "status": 200}])


def _break_chain(s):
    first = s.query(AuditEvent).order_by(AuditEvent.id).first()
    s.execute(update(AuditEvent).where(AuditEvent.id == first.id).values(actor="mallory"))


PLANTS: list[tuple[str, Callable[..., None], str, str, str, str, str]] = [
    ("gate-fresh", _age_gate, "version:demo:1", "high", "block",
     r"production version demo:1 last passed a gate 45\.0 days ago \(decision 1, policy demo-gate\)", "demo"),
    ("data-ok", _fail_pii, "version:demo:1", "critical", "block",
     r"dataset demo/train@dddddddddddd of demo:1 contains PII: notMatch\(prompt, email\)", "demo"),
    ("licence", _bad_licence, "version:demo:1", "high", "block",
     r"base model base:1 of demo:1 has licence 'cc-by-nc-4.0', not one of apache-2.0, mit", "demo"),
    ("checksums", _tamper, "artifact:", "critical", "demote", r"artifact of demo:1 does not verify: .*sha256", "demo"),
    ("card", _drop_card, "version:demo:1", "low", "notify", r"production version demo:1 has no model card", "demo"),
    ("key-age", _old_key, "apikey:old-key", "medium", "notify",
     r"API key old-key \(sk-slw-.*…\) is 120 days old; rotate keys within 90 days", None),
    ("retention", _old_usage, "usage_records", "medium", "notify", r"1 usage records are older than 365 days", None),
    ("audit", _break_chain, "audit_chain", "critical", "notify",
     r"the audit chain breaks at event 1: content does not match its stored hash", None),
]  # fmt: skip


@pytest.mark.parametrize("rule, plant, subject, severity, action, message, model", PLANTS, ids=[p[0] for p in PLANTS])
def test_a_planted_violation_is_found_with_the_rules_severity_and_action(
    sqlite_registry, store, rule, plant, subject, severity, action, message, model
):
    clean(sqlite_registry, store)
    with sqlite_registry.session() as s:
        plant(s, store) if plant is _tamper else plant(s)
    report = run(sqlite_registry, store)
    found = [f for f in report.new if f["rule"] == rule]
    assert len(found) == 1, report.as_json()
    f = found[0]
    assert f["subject"].startswith(subject) and (f["severity"], f["action"]) == (severity, action)
    import re

    assert re.search(message, f["message"]), f["message"]
    others = [x["rule"] for x in report.new if x["rule"] != rule]
    assert others == [], others
    assert report.exit_code == (1 if action == "block" else 0)


def test_old_prompt_logs_are_found_and_purged_with_an_audit_event(sqlite_registry, store):
    from slipway.registry import audit

    clean(sqlite_registry, store)
    store.put("prompt-logs/demo/2020-01-01/000000-aaaa.json", b"{}")
    store.put(f"prompt-logs/demo/{NOW:%Y-%m-%d}/000000-bbbb.json", b"{}")
    report = run(sqlite_registry, store)
    assert [(f["rule"], f["subject"], f["message"]) for f in report.new] == [
        ("retention", "prompt_logs", "1 prompt log objects are older than 30 days")
    ]
    purging = RULES.model_copy(update={"rules": [r.model_copy(update={"purge": True}) if r.id == "retention" else r
                                                 for r in RULES.rules]})  # fmt: skip
    report = compliance.run(sqlite_registry, purging, store=store)
    assert [(f["rule"], f["subject"]) for f in report.resolved] == [("retention", "prompt_logs")]
    assert store.list("prompt-logs") == [f"prompt-logs/demo/{NOW:%Y-%m-%d}/000000-bbbb.json"]
    with sqlite_registry.session() as s:
        ev = audit.list_events(s, action="retention.purge")[0]
        assert ev.target == "prompt_logs" and ev.after["deleted"] == 1 and audit.verify(s) == []


def test_findings_are_diffed_new_then_still_open_then_resolved(registry, store):
    clean(registry, store)
    with registry.session() as s:
        _old_key(s)
    first = run(registry, store)
    assert [f["subject"] for f in first.new] == ["apikey:old-key"]
    second = run(registry, store)
    assert (second.new, [f["subject"] for f in second.still_open]) == ([], ["apikey:old-key"])
    with registry.session() as s:
        keys.revoke_key(s, "old-key")
    third = run(registry, store)
    assert [f["subject"] for f in third.resolved] == ["apikey:old-key"] and third.still_open == []


def test_a_blocking_finding_makes_the_next_gate_refuse_with_its_reason(registry, store):
    from slipway.evaluation.gate import SuiteScores, decide
    from slipway.flows.steps.gate import blocking_findings
    from slipway.policies.gatepolicy import GatePolicy

    clean(registry, store)
    with registry.session() as s:
        _bad_licence(s)
    report = run(registry, store)
    assert report.exit_code == 1
    reasons = blocking_findings(registry, "demo")
    assert reasons == [
        "licence (high): base model base:1 of demo:1 has licence 'cc-by-nc-4.0', not one of apache-2.0, mit"
    ]
    policy = GatePolicy.model_validate(
        {"apiVersion": "slipway/v1", "kind": "GatePolicy", "name": "g", "rules": [{"metric": "acc", "min": 0.1}],
         "min_samples": 1}
    )  # fmt: skip
    scores = SuiteScores("s", candidate={str(i): {"acc": 1.0} for i in range(5)})
    outcome = decide(policy, [scores], blocking_findings=reasons)
    assert outcome.outcome == "failed"
    assert "blocked by open compliance finding: licence (high)" in outcome.summary()
    with registry.session() as s:
        s.execute(update(Model).where(Model.name == "base").values(license="mit"))
    assert run(registry, store).exit_code == 0 and blocking_findings(registry, "demo") == []


def test_a_check_for_one_model_leaves_other_models_findings_open(sqlite_registry, store):
    clean(sqlite_registry, store)
    with sqlite_registry.session() as s:
        catalog.create_model(s, name="other", license="gpl-3.0")
        catalog.create_version(s, model="other")
        catalog.set_alias(s, model="other", alias="production", version=1)
    assert {f["subject"] for f in run(sqlite_registry, store).new if f["rule"] == "licence"} == {"version:other:1"}
    report = run(sqlite_registry, store, model="demo")
    assert report.resolved == [] and report.blocking == []
    with pytest.raises(compliance.ComplianceError, match="no model named 'nope'"):
        run(sqlite_registry, store, model="nope")


def test_canary_plans_are_checked_against_the_rollback_bound(sqlite_registry, store):
    from slipway.policies.loader import load_text

    clean(sqlite_registry, store)
    plan = """\
        apiVersion: slipway/v1
        kind: CanaryPlan
        name: slow-canary
        steps: [{setWeight: 10}]
        analysis: {interval_s: 5, failure_limit: 3, metrics: [{name: error_rate, thresholdRange: {max: 0.1}}]}
    """
    docs = load_text(textwrap.dedent(plan), "canary.yaml")
    found = [f for f in run(sqlite_registry, store, docs=docs).new if f["rule"] == "rollback"]
    assert [(f["subject"], f["message"]) for f in found] == [
        ("canaryplan:slow-canary", "CanaryPlan slow-canary may take 20 s to roll back in the worst case "
         "(canary.yaml:1); the bound is 10 s")
    ]  # fmt: skip


def test_s3_artifacts_must_be_encrypted_with_sse_kms(sqlite_registry, store, s3):
    clean(sqlite_registry, store)
    good = s3.store.put("models/demo/1/good.bin", b"encrypted with SSE-KMS")
    s3.s3.put_object(Bucket=s3.bucket, Key="models/demo/1/plain.bin", Body=b"not encrypted")
    with sqlite_registry.session() as s:
        mv = catalog.get_version(s, "demo", 1)
        catalog.add_artifact(s, mv, catalog.ArtifactSpec("weights", good.uri, good.sha256, good.size))
    assert [r.status for r in run(sqlite_registry, store).results if r.rule == "sse-kms"] == ["passed"]
    with sqlite_registry.session() as s:
        mv = catalog.get_version(s, "demo", 1)
        plain = f"s3://{s3.bucket}/models/demo/1/plain.bin"
        catalog.add_artifact(s, mv, catalog.ArtifactSpec("weights", plain, "0" * 64, 13))
    found = [f for f in run(sqlite_registry, store).new if f["rule"] == "sse-kms"]
    assert [(f["subject"], f["severity"], f["action"]) for f in found] == [(f"artifact:{plain}", "high", "notify")]
    assert found[0]["message"].startswith("artifact of demo:1 is not encrypted with SSE-KMS: models/demo/1/plain.bin")


def test_a_demote_finding_moves_production_back_to_the_previous_version(sqlite_registry, store):
    """`checksums` demotes: a promoted demo:2 whose weights no longer verify is taken off production, back to
    demo:1 (registry only here: nothing serves), once; the next run finds it no longer in production."""
    clean(sqlite_registry, store)
    weights = store.put("models/demo/2/weights.bin", b"weights of demo v2")
    with sqlite_registry.session() as s:
        v2 = catalog.create_version(
            s,
            model="demo",
            base=catalog.resolve(s, "base:1"),
            dataset_digest="d" * 64,
            artifacts=[catalog.ArtifactSpec("weights", weights.uri, weights.sha256, weights.size)],
        )
        evals.record_gate_decision(
            s, version=v2, champion=None, policy="demo-gate", outcome="passed", reasons=[], eval_run_ids=[]
        )
        catalog.set_alias(s, model="demo", alias="production", version=2)
    modelcard.write_model_card(sqlite_registry, "demo:2", store=store, intended_use="Tests.")
    store.put("models/demo/2/weights.bin", b"weights of demo v2, altered")
    report = run(sqlite_registry, store)
    assert [(f["rule"], f["action"]) for f in report.new] == [("checksums", "demote")], report.as_json()
    lines = compliance.demote(sqlite_registry, report)
    assert len(lines) == 1 and lines[0].startswith("demo: production 2 -> 1 (compliance demote: checksums:")
    with sqlite_registry.session() as s:
        assert catalog.resolve(s, "demo@production").version == 1
    again = run(sqlite_registry, store)
    assert compliance.demote(sqlite_registry, again) == []  # nothing new: no second demotion

"""The canary controller: deploy the candidate beside the champion, walk the plan, judge every window,
and either complete or roll back — weight 0 at once, candidate drained and removed, reason recorded.

The desired state is written to the registry before Ray Serve is touched, so a controller that dies can be
reconciled (``slipway reconcile``) to a safe state: the champion at 100 %.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slipway.policies.canaryplan import AnalysisStep, CanaryPlan, Hold, Mirror, SetWeight
from slipway.registry import Registry, canaries, catalog, leases
from slipway.registry.models import VersionStatus
from slipway.serve.canary.analysis import Verdict, judge
from slipway.serve.canary.evidence import Evidence
from slipway.serve.errors import ServeError

log = logging.getLogger(__name__)

LEASE_TTL = dt.timedelta(seconds=60)
#: Window counts of a second are taken once this many seconds have passed it (gateways push every 0.25 s).
COUNTS_SETTLE_S = 2
#: Pairs judged per analysis interval at most (an LLM judge is slow; the rest wait in the store).
PAIRS_PER_TICK = 500


class RolloutError(ServeError):
    """The rollout could not run (nothing to roll out against, plan unusable, serving unreachable)."""


class RolledBack(ServeError):
    """The canary was rolled back; the message says why."""


@dataclass
class TimelineEntry:
    t: float  # seconds since the rollout started
    event: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutResult:
    outcome: str  # completed | rolled_back
    reason: str
    timeline: list[TimelineEntry]
    candidate: str
    champion: str
    rollback_at: float | None = None  # seconds since start when the canary's weight went to 0
    # Wall-clock time (epoch seconds) the canary's weight went to 0: when a gateway's breaker tripped, else
    # when the controller set it. Comparable with a fault's onset measured elsewhere on the same clock.
    weight_zero_at: float | None = None
    # What decided: sequential (the tests of analysis.sequential), guard (a fixed bound's failed windows),
    # breaker, deadline, plan (every step passed, no sequential analysis) or error.
    decided_by: str | None = None
    analysis_id: int | None = None  # the registry's CanaryAnalysis (slipway canary explain ID), when sequential


class Controller:
    """Runs one canary of ``model``: ``candidate`` vs the live ``champion`` under ``plan``.

    ``control`` is the serving control plane (``slipway.serve.control``); ``quality_probe`` optionally scores
    a sample of canary answers for ``quality`` metrics. The caller holds the promotion lease as ``holder``.
    """

    def __init__(
        self,
        reg: Registry,
        plan: CanaryPlan,
        *,
        model: str,
        candidate: int,
        champion: int,
        holder: str,
        control: Any,
        serving_config: Any = None,
        run_id: str | None = None,
        quality_probe: Callable[[Any], dict[str, float]] | None = None,
        judge_model: Callable[[str, str], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], float] = time.time,
    ):
        self.reg, self.plan, self.model = reg, plan, model
        self.candidate, self.champion = candidate, champion
        self.holder, self.control, self.config, self.run_id = holder, control, serving_config, run_id
        self.quality_probe = quality_probe
        self.clock, self.sleep, self.wall = clock, sleep, wall
        self.t0 = clock()
        spec = plan.analysis.sequential
        # ``judge_model(model, prompt) -> completion`` answers llm judges (default: the model's live version).
        self.evidence = (
            None
            if spec is None
            else Evidence(
                spec,
                plan.analysis.metrics,
                candidate=str(candidate),
                champion=str(champion),
                complete=judge_model or _served_judge(plan),
            )
        )
        self.analysis_id: int | None = None
        self.counts_from: int | None = None  # epoch second from which window counts are not yet in the evidence
        self.pairing = self.evidence is not None and self.evidence.needs_pairs
        self._judged: deque[tuple[float, str, float, float]] = deque(maxlen=10_000)  # (t, label, cand, champ)
        self._saved_at = -1e9
        self.timeline: list[TimelineEntry] = []
        self.weight = 0.0
        self.mirror = 0.0
        self.failures = 0
        self.last_renew = 0.0
        self._last_verdict = Verdict("inconclusive")
        # Evidence per weight: when the traffic split last changed, and whether a window has passed since.
        self.split_since = self.t0
        self.passed_since_split = False

    # --- plumbing ---------------------------------------------------------------------------------

    def _log(self, event: str, **detail: Any) -> None:
        entry = TimelineEntry(round(self.clock() - self.t0, 3), event, detail)
        self.timeline.append(entry)
        log.info("canary %s:%s %s %s", self.model, self.candidate, event, detail or "")

    def _apply(self, reason: str) -> None:
        w = self.weight / 100.0
        weights = {self.champion: 1.0 - w, self.candidate: w} if w < 1.0 else {self.candidate: 1.0}
        shadow = {self.candidate: self.mirror / 100.0} if self.mirror and w < 1.0 else {}
        if self.pairing and w > 0:  # pairs at this weight: each version also answers a share of the other's requests
            share = self.plan.analysis.sequential.pair_share  # type: ignore[union-attr]
            shadow[self.champion] = share
            if w < 1.0:
                shadow[self.candidate] = max(shadow.get(self.candidate, 0.0), share)
        self.control.set_weights(
            self.model, weights, shadow=shadow, reason=reason, registry=self.reg, pipeline_run_id=self.run_id
        )
        self._log("weights", canary_percent=self.weight, mirror_percent=self.mirror, reason=reason)

    def _renew(self) -> None:
        now = self.clock()
        if now - self.last_renew < 5.0:
            return
        with self.reg.session() as s:
            leases.renew(s, model=self.model, holder=self.holder, ttl=LEASE_TTL)
        self.last_renew = now

    def _deadline_left(self) -> float:
        return self.plan.deadline_s - (self.clock() - self.t0)

    # --- the rollout -----------------------------------------------------------------------------

    def run(self) -> RolloutResult:
        """Walk the plan; returns the result (rolled back or completed). Never leaves the canary half-on:
        any exception rolls back before it propagates."""
        cand_ref, champ_ref = f"{self.model}:{self.candidate}", f"{self.model}:{self.champion}"
        with self.reg.session() as s:
            v = catalog.get_version(s, self.model, self.candidate)
            if v.status not in (VersionStatus.REGISTERED, VersionStatus.CANDIDATE, VersionStatus.ABORTED):
                raise RolloutError(f"{cand_ref} is {v.status}; only a registered or gated candidate can canary")
            catalog.set_status(s, v, VersionStatus.CANDIDATE, reason=f"canary under plan {self.plan.name}")
            if self.evidence is not None:
                self.analysis_id = canaries.start_analysis(
                    s,
                    model=self.model,
                    candidate=self.candidate,
                    champion=self.champion,
                    plan=self.plan.name,
                    alpha=self.evidence.spec.alpha,
                    pipeline_run_id=self.run_id,
                ).id
        self.counts_from = int(self.wall())
        try:
            self.control.deploy_version(self.model, self.candidate, config=self.config, registry=self.reg)
            self._log("deployed", app=f"{self.model}-v{self.candidate}")
            self.control.set_breaker(self.model, self.candidate, self.plan.breaker.consecutive_errors)
            for i, step in enumerate(self.plan.steps):
                self._renew()
                if self._deadline_left() <= 0:
                    return self._rollback(f"deadline of {self.plan.deadline_s:g} s passed at step {i + 1}", None)
                if isinstance(step, SetWeight):
                    if step.setWeight != self.weight:
                        bad = self._evidence_at_this_weight()
                        if bad is not None:
                            return bad
                    self.weight = step.setWeight
                    self._apply(f"canary step {i + 1}: setWeight {step.setWeight:g}")
                    self._split_changed()
                elif isinstance(step, Mirror):
                    self.mirror = step.mirror
                    self._apply(f"canary step {i + 1}: mirror {step.mirror:g}")
                    self._split_changed()
                elif isinstance(step, Hold):
                    bad = self._hold(step.hold.duration_s or 0.0, step.hold.min_requests or 0)
                    if bad is not None:
                        return bad
                elif isinstance(step, AnalysisStep):
                    bad = self._await_pass()
                    if bad is not None:
                        return bad
            bad = self._evidence_at_this_weight()  # the last weight too: no promotion without evidence there
            if bad is not None:
                return bad
            if self.evidence is not None:  # every step passed its guards: the sequential tests still decide
                return self._await_decision()
            self._log("completed", canary_percent=self.weight)
            return RolloutResult(
                "completed", "every step passed", self.timeline, cand_ref, champ_ref, decided_by="plan"
            )
        except BaseException as e:  # undo the canary whatever happened (even Ctrl-C), then re-raise
            if not any(t.event == "rolled_back" for t in self.timeline):
                try:
                    self._rollback(f"rollout failed: {type(e).__name__}: {e}", None)
                except Exception:
                    log.exception("rollback after a failure failed; run `slipway reconcile`")
            raise

    def _split_changed(self) -> None:
        self.split_since = self.clock()
        self.passed_since_split = False

    def _evidence_at_this_weight(self) -> RolloutResult | None:
        """Before the split moves on (or the rollout completes), one window must have passed at the current
        weight; a plan that reaches a weight without an ``analysis`` or a passing ``hold`` window gets one here."""
        if self.weight <= 0 or self.passed_since_split:
            return None
        self._log("implicit_analysis", canary_percent=self.weight)
        return self._await_pass()

    def _window(self) -> Verdict:
        """The verdict on the last ``window_s`` seconds, but never on traffic from before the split last changed:
        a weight is judged on what was served at that weight."""
        a = self.plan.analysis
        seconds = min(a.window_s, max(a.interval_s, self.clock() - self.split_since))
        m = self.control.metrics(self.model, seconds=seconds)
        health = getattr(self.control, "version_health", None)
        if health is not None:  # no window passes while nothing healthy serves the candidate (Serve's view)
            ok, detail = health(self.model, self.candidate)
            if not ok:
                values = {"requests": int((m.get(str(self.candidate)) or {}).get("requests", 0))}
                return Verdict("fail", [f"{self.model}:{self.candidate} is unhealthy in Serve: {detail}"], values)
        quality = self.quality_probe(self) if self.quality_probe is not None else None
        judged = self._judged_window(seconds)
        if judged:
            quality = {**(quality or {}), **judged}
        return judge(a, m.get(str(self.candidate)), m.get(str(self.champion)), quality)

    def _judged_window(self, seconds: float) -> dict[str, float]:
        """Per judged quality metric, the mean scores of the pairs judged in the last ``seconds`` (candidate's under
        the metric's label, the champion's under ``champion:<label>``): what its fixed bounds, if any, guard."""
        since = self.clock() - seconds
        while self._judged and self._judged[0][0] < since:
            self._judged.popleft()
        sums: dict[str, list[float]] = {}
        for _t, label, cand, champ in self._judged:
            acc = sums.setdefault(label, [0.0, 0.0, 0.0])
            acc[0], acc[1], acc[2] = acc[0] + cand, acc[1] + champ, acc[2] + 1
        out = {}
        for label, (cand, champ, n) in sums.items():
            out[label], out[f"champion:{label}"] = cand / n, champ / n
        return out

    def _tick(self) -> RolloutResult | None:
        """One analysis interval: breaker first, then the window's verdict (the fixed bounds, guards), then the
        sequential evidence."""
        trip = self.control.breaker_tripped(self.model, self.candidate)
        if trip:
            reason = f"breaker: {self.plan.breaker.consecutive_errors} consecutive canary errors"
            return self._rollback(reason, None, zeroed_at=trip.get("at") if isinstance(trip, dict) else None)
        verdict = self._window()
        if verdict.status == "fail":
            self.failures += 1
            self._log("analysis_failed", failures=self.failures, reasons=verdict.reasons, values=verdict.values)
            if self.failures >= self.plan.analysis.failure_limit:
                return self._rollback("analysis: " + "; ".join(verdict.reasons), verdict)
        elif verdict.status == "pass":
            self.failures = 0
            self.passed_since_split = True
        self._last_verdict = verdict
        return self._sequential() if self.evidence is not None else None

    # --- sequential evidence ----------------------------------------------------------------------------

    def _sequential(self) -> RolloutResult | None:
        """Feed the evidence what arrived since the last interval (settled window counts, pairs of answers),
        record the pairs' scores, and act on its decision: roll back, complete early, or go on."""
        ev = self.evidence
        assert ev is not None
        end = int(self.wall()) - COUNTS_SETTLE_S
        if self.counts_from is not None and end > self.counts_from:
            counts = self.control.counts(self.model, start=self.counts_from, end=end)
            ev.add_counts(counts.get(str(self.candidate)), counts.get(str(self.champion)))
            self.counts_from = end
        scores = []
        if ev.needs_pairs:
            for pair in self.control.take_pairs(self.model, limit=PAIRS_PER_TICK):
                scores += ev.add_pair(pair)
        now = self.clock()
        self._judged.extend((now, p.metric, p.candidate, p.champion) for p in scores if p.metric.startswith("quality."))
        if scores:
            with self.reg.session() as s:
                canaries.record_pair_scores(
                    s,
                    int(self.analysis_id or 0),
                    (
                        {
                            "pair_id": p.pair_id,
                            "request_id": p.request_id,
                            "metric": p.metric,
                            "candidate_score": p.candidate,
                            "champion_score": p.champion,
                            "difference": p.difference,
                            "detail": p.detail,
                        }
                        for p in scores
                    ),
                )
        decision = ev.decision(self.clock() - self.t0)
        if decision.action == "rollback":
            return self._rollback(f"sequential: {decision.reason}", None)
        if decision.action == "promote" and ev.spec.promote_early and self._last_verdict.status != "fail":
            return self._complete(f"sequential: {decision.reason}")
        self._save_analysis()
        return None

    def _await_decision(self) -> RolloutResult:
        """After the last step: keep judging at the final weight until the sequential tests decide (or the
        deadline passes, which rolls back)."""
        self._log("awaiting_sequential_decision", canary_percent=self.weight)
        ev = self.evidence
        assert ev is not None
        while True:
            bad = self._tick()
            if bad is not None:
                return bad
            if ev.decision(self.clock() - self.t0).action == "promote":  # promote_early off: decided at the end
                return self._complete("sequential: " + ev.decision(self.clock() - self.t0).reason)
            if self._deadline_left() <= 0:
                return self._rollback("deadline passed before the sequential analysis decided", None)
            self._renew()
            self.sleep(self.plan.analysis.interval_s)

    def _complete(self, reason: str) -> RolloutResult:
        """The evidence shows non-inferiority on every sequential metric: the rollout completes here, whatever
        steps remain (``promote`` then moves production); mirroring and pairing stop."""
        self.pairing, self.mirror = False, 0.0
        self._apply("canary complete: " + reason[:200])
        self._log("completed", canary_percent=self.weight, reason=reason, decided_by="sequential")
        self._save_analysis(status="completed", decided_by="sequential", reason=reason)
        return RolloutResult(
            "completed",
            reason,
            self.timeline,
            f"{self.model}:{self.candidate}",
            f"{self.model}:{self.champion}",
            decided_by="sequential",
            analysis_id=self.analysis_id,
        )

    def _save_analysis(self, *, status: str | None = None, decided_by: str | None = None, reason: str = "") -> None:
        """The analysis row as it stands: every few seconds while running, and at the end."""
        if self.evidence is None or self.analysis_id is None:
            return
        now = self.clock()
        if status is None and now - self._saved_at < 2.0:
            return
        self._saved_at = now
        with self.reg.session() as s:
            canaries.update_analysis(
                s,
                self.analysis_id,
                metrics=self.evidence.rows(),
                trajectory=self.evidence.trajectories(),
                pairs=self.evidence.pairs_seen,
                status=status,
                decided_by=decided_by,
                reason=reason or None,
            )

    def _hold(self, duration_s: float, min_requests: int) -> RolloutResult | None:
        start = self.clock()
        served0 = self._canary_requests()
        while True:
            bad = self._tick()
            if bad is not None:
                return bad
            waited = self.clock() - start
            served = self._canary_requests() - served0
            if waited >= duration_s and served >= min_requests:
                self._log("hold_done", seconds=round(waited, 2), canary_requests=served)
                return None
            if self._deadline_left() <= 0:
                return self._rollback(f"deadline passed while holding ({served}/{min_requests} requests)", None)
            self._renew()
            self.sleep(self.plan.analysis.interval_s)

    def _await_pass(self) -> RolloutResult | None:
        while True:
            bad = self._tick()
            if bad is not None:
                return bad
            if self._last_verdict.status == "pass":
                self._log("analysis_passed", values=self._last_verdict.values)
                return None
            if self._deadline_left() <= 0:
                return self._rollback("deadline passed waiting for a conclusive analysis window", None)
            self._renew()
            self.sleep(self.plan.analysis.interval_s)

    def _canary_requests(self) -> int:
        m = self.control.metrics(self.model, seconds=self.plan.deadline_s)
        return int((m.get(str(self.candidate)) or {}).get("requests", 0))

    def _rollback(self, reason: str, verdict: Verdict | None, *, zeroed_at: float | None = None) -> RolloutResult:
        """Weight 0 at once, then drain and remove the candidate, mark it rejected with the evidence."""
        self.weight, self.mirror = 0.0, 0.0
        wall = time.time()
        self.control.set_weights(
            self.model,
            {self.champion: 1.0},
            shadow={},
            reason=f"rollback: {reason}",
            registry=self.reg,
            pipeline_run_id=self.run_id,
        )
        at = round(self.clock() - self.t0, 3)
        decided_by = _decided_by(reason)
        self._log("rolled_back", reason=reason, values=verdict.values if verdict else {}, decided_by=decided_by)
        try:
            self._save_analysis(status="rolled_back", decided_by=decided_by, reason=reason)
        except Exception:  # the record of the evidence must not keep the candidate half-on
            log.exception("could not record the canary analysis")
        try:
            self.control.remove_version(
                self.model, self.candidate, drain_timeout_s=self.plan.drain_timeout_s, registry=self.reg
            )
        except Exception as e:  # the weight is already 0: removal can be finished by reconcile
            log.warning("could not remove the canary application: %s", e)
        with self.reg.session() as s:
            v = catalog.get_version(s, self.model, self.candidate)
            evidence = f"; evidence {verdict.values}" if verdict else ""
            catalog.set_status(s, v, VersionStatus.REJECTED, reason=f"canary rolled back: {reason}{evidence}")
        return RolloutResult(
            "rolled_back",
            reason,
            self.timeline,
            f"{self.model}:{self.candidate}",
            f"{self.model}:{self.champion}",
            rollback_at=at,
            weight_zero_at=zeroed_at or wall,
            decided_by=decided_by,
            analysis_id=self.analysis_id,
        )


def _decided_by(reason: str) -> str:
    """Which evidence a rollback's reason names."""
    for prefix, who in (("breaker", "breaker"), ("analysis:", "guard"), ("sequential:", "sequential")):
        if reason.startswith(prefix):
            return who
    return "deadline" if "deadline" in reason else "error"


def _served_judge(plan: CanaryPlan) -> Callable[[str, str], str] | None:
    """``(model, prompt) -> completion`` through the judge model's live version, for plans with an llm judge."""
    specs = {m.judge.llm.model: m.judge.llm for m in plan.analysis.metrics if m.judge and m.judge.llm}
    if not specs:
        return None

    def ask(model: str, prompt: str) -> str:
        from slipway.serve.canary.quality import ask_served

        return ask_served(model, prompt, max_tokens=specs[model].max_tokens)

    return ask

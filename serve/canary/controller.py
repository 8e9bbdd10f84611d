"""The canary controller: deploy the candidate beside the champion, walk the plan, judge every window,
and either complete or roll back — weight 0 at once, candidate drained and removed, reason recorded.

The desired state is written to the registry before Ray Serve is touched, so a controller that dies can be
reconciled (``slipway reconcile``) to a safe state: the champion at 100 %.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slipway.policies.canaryplan import AnalysisStep, CanaryPlan, Hold, Mirror, SetWeight
from slipway.registry import Registry, catalog, leases
from slipway.registry.models import VersionStatus
from slipway.serve.canary.analysis import Verdict, judge
from slipway.serve.errors import ServeError

log = logging.getLogger(__name__)

LEASE_TTL = dt.timedelta(seconds=60)


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
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.reg, self.plan, self.model = reg, plan, model
        self.candidate, self.champion = candidate, champion
        self.holder, self.control, self.config, self.run_id = holder, control, serving_config, run_id
        self.quality_probe = quality_probe
        self.clock, self.sleep = clock, sleep
        self.t0 = clock()
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
            self._log("completed", canary_percent=self.weight)
            return RolloutResult("completed", "every step passed", self.timeline, cand_ref, champ_ref)
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
        return judge(a, m.get(str(self.candidate)), m.get(str(self.champion)), quality)

    def _tick(self) -> RolloutResult | None:
        """One analysis interval: breaker first, then the window's verdict."""
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
        return None

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
        self._log("rolled_back", reason=reason, values=verdict.values if verdict else {})
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
        )

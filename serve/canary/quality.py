"""Online quality analysis of a canary: a sample of an EvalSuite's examples answered by the candidate and by the
champion, live on Ray Serve, scored with the suite's metric, once per analysis window.

The probe calls each version's Serve application directly (not through the gateway), so its requests are not
client traffic: they neither count in the per-version windows nor reach usage records. Each probe takes the
next ``sample`` examples of the suite (cycling), so successive windows see different examples; both versions
answer the same ones. The result feeds :func:`slipway.serve.canary.analysis.judge` as ``{metric: candidate mean,
"champion:<metric>": champion mean}``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from slipway.evaluation.suite import Example, Generated, load_examples, run_suite
from slipway.policies.canaryplan import AnalysisMetric, CanaryPlan
from slipway.policies.evalsuite import EvalSuite, GenerationParams


class ServeTarget:
    """A live version's Serve application as an evaluation target (generation only); an adapter version is its
    base's application with the adapter named in every request."""

    def __init__(self, app: str, *, adapter: str | None = None, timeout_s: float = 60.0) -> None:
        self.name, self.app, self.adapter, self.timeout_s = adapter or app, app, adapter, timeout_s

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generated]:
        from ray import serve

        from slipway.serve.model_server import DEPLOYMENT_NAME

        h = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=self.app)
        t0 = time.perf_counter()
        calls = [
            h.generate.remote(
                {
                    "prompt": p,
                    "max_tokens": params.max_new_tokens,
                    "temperature": params.temperature,
                    "top_p": params.top_p,
                    "stop": list(params.stop),
                    "seed": params.seed,
                    "deadline": time.time() + self.timeout_s,
                }
                | ({"adapter": self.adapter} if self.adapter else {})  # an adapter version: on its base's replicas
            )
            for p in prompts
        ]  # sent together: the server batches them
        outs = [c.result(timeout_s=self.timeout_s) for c in calls]
        per = (time.perf_counter() - t0) * 1000 / max(1, len(prompts))
        # A failed answer scores as an empty output: a broken canary has no quality.
        return [Generated("" if "error" in o else o.get("text", ""), o.get("completion_tokens", 0), per) for o in outs]

    def log_likelihood(self, prompts: Sequence[str], references: Sequence[str], batch_size: int) -> list[float]:
        raise NotImplementedError("log-likelihood metrics cannot be probed online; use a generation metric")


def ask_served(model: str, prompt: str, *, max_tokens: int = 8, timeout_s: float = 60.0) -> str:
    """``model``'s live version (the one with most traffic) completes ``prompt`` greedily, called on its Serve
    application directly (no client traffic, no usage row): how an ``llm`` judge of a canary is asked."""
    from slipway.serve import control

    weights = control.get_weights(model)["weights"]
    version = max(weights, key=lambda v: weights[v])
    app, adapter = control.serving_target(model, int(version))
    params = GenerationParams(max_new_tokens=max_tokens, temperature=0.0)
    return ServeTarget(app, adapter=adapter, timeout_s=timeout_s).generate([prompt], params)[0].text


class QualityProbe:
    """Scores the candidate and the champion on the plan's ``quality`` metrics; callable as a controller's
    ``quality_probe``. Re-probes at most every ``min_interval_s`` (default half the analysis window) and returns
    the last result in between, so a 1-second analysis interval does not generate answers every second."""

    def __init__(self, plan: CanaryPlan, suites: dict[str, EvalSuite], *, min_interval_s: float | None = None):
        probed = [m for m in plan.analysis.metrics if m.name == "quality" and m.suite is not None]
        self.metrics: list[AnalysisMetric] = probed
        self.suites = suites
        self.min_interval_s = plan.analysis.window_s / 2 if min_interval_s is None else min_interval_s
        self._examples: dict[str, list[Example]] = {}
        self._offset: dict[str, int] = {}
        self._last: tuple[float, dict[str, float]] | None = None
        self.probes = 0

    def _sample(self, suite: EvalSuite, n: int) -> list[Example]:
        if suite.name not in self._examples:
            self._examples[suite.name] = load_examples(suite)[0]
            self._offset[suite.name] = 0
        pool, start = self._examples[suite.name], self._offset[suite.name]
        picked = [pool[(start + i) % len(pool)] for i in range(min(n, len(pool)))]
        self._offset[suite.name] = (start + len(picked)) % len(pool)
        return picked

    def __call__(self, controller: Any) -> dict[str, float]:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.min_interval_s:
            return self._last[1]
        from slipway.serve.control import serving_target

        out: dict[str, float] = {}
        for m in self.metrics:
            suite = self.suites[str(m.suite)]
            scoped = suite.model_copy(update={"metrics": [s for s in suite.metrics if s.name == m.metric]})
            examples = self._sample(suite, m.sample)
            for role, version in (("", controller.candidate), ("champion:", controller.champion)):
                app, adapter = serving_target(controller.model, version)
                res = run_suite(ServeTarget(app, adapter=adapter), scoped, examples)
                out[f"{role}{m.metric}"] = float(res.aggregates.get(str(m.metric), 0.0))
        self.probes += 1
        self._last = (now, out)
        return out

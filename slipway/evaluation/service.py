"""Evaluate registered versions on a suite and record the runs; shared by the ``evaluate`` step and the CLI."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slipway.evaluation.suite import (
    InProcessTarget,
    OpenAITarget,
    SuiteResult,
    Target,
    load_examples,
    metric_properties,
    run_suite,
)
from slipway.policies.evalsuite import EvalSuite
from slipway.registry import Registry, catalog, evals

log = logging.getLogger(__name__)

_CACHE: OrderedDict[str, InProcessTarget] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 3


def in_process_target(reg: Registry, ref: str) -> InProcessTarget:
    """The version ``ref`` loaded in this process (a few recent ones are kept, keyed by artifact checksum)."""
    from slipway.llm.checkpoint import load_version, version_artifact

    name, uri, sha = version_artifact(reg, ref)
    key = f"{uri}#{sha}"
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    model, tokenizer = load_version(reg, name)
    model.eval()
    target = InProcessTarget(name, model, tokenizer)
    with _CACHE_LOCK:
        _CACHE[key] = target
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return target


def provider_target(reg: Registry, ref: str) -> OpenAITarget | None:
    """A provider version (``slipway provider register``) evaluated at its upstream, the same suite and examples
    as any version — so a gate can compare a fine-tune with the provider it would replace; None for a version
    with weights. Only ``api: openai`` upstreams: a Bedrock provider has no OpenAI-compatible endpoint to ask."""
    from slipway.policies.provider import from_params, resolve_secret

    with reg.session() as s:
        doc = from_params(catalog.resolve(s, ref).params)
    if doc is None:
        return None
    if doc.api != "openai" or doc.base_url is None:
        raise ValueError(f"{ref}: provider {doc.name} (api {doc.api}) cannot be evaluated; only api openai can")
    return OpenAITarget(ref, doc.base_url, doc.model, resolve_secret(doc.api_key) or "none")


@dataclass
class Evaluation:
    candidate: str
    champion: str | None
    run_id: int
    champion_run_id: int | None
    result: SuiteResult
    champion_result: SuiteResult | None


def default_champion(reg: Registry, candidate_ref: str) -> str | None:
    """``MODEL@production`` when that alias exists and points to another version than the candidate."""
    with reg.session() as s:
        cand = catalog.resolve(s, candidate_ref)
        alias = catalog.find_alias(s, cand.model.name, "production")
        if alias is None or alias.version_id == cand.id:
            return None
        return alias.version.ref


def evaluate(
    reg: Registry,
    suite: EvalSuite,
    candidate: str,
    *,
    champion: str | None = None,
    compare: bool = True,
    base_url: str | None = None,
    api_key: str | None = None,
    endpoint_model: str | None = None,
    limit: int | None = None,
    pipeline_run_id: str | None = None,
    role: str = "candidate",
    progress: Callable[[str, int, int], None] | None = None,
) -> Evaluation:
    """Evaluate ``candidate`` (and the champion, on the same examples) and record both runs.

    The champion defaults to ``MODEL@production``; ``compare=False`` evaluates the candidate alone. With
    ``base_url`` the candidate is evaluated through that OpenAI-compatible endpoint instead of in process.
    """
    examples, digest = load_examples(suite, limit=limit)
    if compare and champion is None:
        champion = default_champion(reg, candidate)
    if not compare:
        champion = None
    with reg.session() as s:
        cand_ref = catalog.resolve(s, candidate).ref
        champ_ref = catalog.resolve(s, champion).ref if champion else None

    def target_for(ref: str) -> Target:
        if base_url:
            return OpenAITarget(ref, base_url, endpoint_model or ref.split(":")[0], api_key or "none")
        return provider_target(reg, ref) or in_process_target(reg, ref)

    def one(ref: str, run_role: str, baseline: int | None) -> tuple[int, SuiteResult]:
        log.info("evaluating %s on %s (%d examples)", ref, suite.name, len(examples))
        res = run_suite(
            target_for(ref), suite, examples, progress=(lambda d, n: progress(ref, d, n)) if progress else None
        )
        with reg.session() as s:
            version = catalog.resolve(s, ref)
            run = evals.create_eval_run(
                s,
                version=version,
                target=ref,
                suite=suite.name,
                role=run_role,
                pipeline_run_id=pipeline_run_id,
                dataset_digest=digest,
                baseline_run_id=baseline,
            )
            evals.add_results(s, run, res.rows)
            evals.finish_eval_run(s, run, aggregates=res.aggregates, n_examples=len(res.rows))
            return run.id, res

    champ_run_id, champ_res = one(champ_ref, "champion", None) if champ_ref else (None, None)
    run_id, res = one(cand_ref, role, champ_run_id)
    return Evaluation(cand_ref, champ_ref, run_id, champ_run_id, res, champ_res)


def suite_scores(reg: Registry, run_id: int, suite: EvalSuite | None = None) -> Any:
    """The :class:`~slipway.evaluation.gate.SuiteScores` of a recorded candidate run and its baseline."""
    from slipway.evaluation.gate import SuiteScores

    with reg.session() as s:
        run = evals.get_eval_run(s, run_id)
        cand = evals.scores_by_example(s, run.id)
        champ = evals.scores_by_example(s, run.baseline_run_id) if run.baseline_run_id else None
        name = run.suite
    binary, higher = metric_properties(suite) if suite is not None else ({}, {})
    if suite is None:
        binary = {
            m: all(v in (0.0, 1.0) for v in (sc.get(m) for sc in cand.values()) if v is not None)
            for m in {m for sc in cand.values() for m in sc}
        }
    return SuiteScores(name, cand, champ, binary=binary, higher_is_better=higher)

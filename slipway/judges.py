"""Judging a pair of live answers: the same request answered by the candidate and by the champion.

A canary's ``quality`` metric with a ``judge`` (:class:`slipway.policies.canaryplan.JudgeSpec`) turns each pair
into one number, the pair's **difference** ``champion score - candidate score`` in [-1, 1], higher meaning the
candidate is worse — what :class:`slipway.sequential.SequentialTest` takes. Three kinds:

- **checks** (reference-free): each answer on its own passes JSON validity, a JSON Schema, no refusal, length
  bounds and no PII leak, or fails; a score is 1 or 0 (the metrics of :mod:`slipway.metrics`, as offline);
- **agreement** with the champion's answer, taken as right: exact, normalised, or an embedding-free string
  similarity (difflib's ratio) against a threshold; the difference is 1 where the candidate disagrees;
- **llm**: a judge model compares both answers under a rubric, asked in both orders when ``position_swap`` (a
  win counts only when both orders name the same answer; anything else is a tie), as MT-Bench's pairwise judge
  does to remove position bias. The model is reached through ``complete(prompt) -> text``, supplied by the
  caller (serving answers it with a model the gateway serves).

Pure functions of texts: no network here, and nothing is stored — the caller records the scores.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slipway import metrics

if TYPE_CHECKING:  # the specs are read, never built here: the shared core imports no pillar at run time
    from slipway.policies.canaryplan import AgreementJudge, ChecksJudge, JudgeSpec, LlmJudge

#: A judge model: the prompt in, its completion out.
Complete = Callable[[str], str]


@dataclass(frozen=True)
class PairScore:
    """One pair as judged: each answer's score (1 good, 0 bad; for agreement the champion is 1 by definition;
    for llm the winner's is 1, both 0.5 on a tie) and their difference ``champion - candidate``."""

    candidate: float
    champion: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def difference(self) -> float:
        return self.champion - self.candidate


# --- checks ----------------------------------------------------------------------------------------------


def check_failures(spec: ChecksJudge, text: str) -> list[str]:
    """The checks ``text`` fails, by name (empty: it passes every one)."""
    failed = []
    parsed: Any = None
    if spec.valid_json or spec.json_schema is not None:
        try:
            parsed = metrics._parse_json(text)
        except ValueError:
            failed.append("valid_json")
    if spec.json_schema is not None and not failed:
        import jsonschema

        if not jsonschema.Draft202012Validator(spec.json_schema).is_valid(parsed):
            failed.append("json_schema")
    if spec.refusal and metrics.refusal(text, {}):
        failed.append("refusal")
    if spec.min_chars is not None and len(text) < spec.min_chars:
        failed.append("min_chars")
    if spec.max_chars is not None and len(text) > spec.max_chars:
        failed.append("max_chars")
    if spec.pii and metrics.pii_leak(text, {}):
        failed.append("pii")
    return failed


def judge_checks(spec: ChecksJudge, candidate: str, champion: str) -> PairScore:
    c, h = check_failures(spec, candidate), check_failures(spec, champion)
    return PairScore(float(not c), float(not h), {"candidate_failed": c, "champion_failed": h})


# --- agreement -------------------------------------------------------------------------------------------

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Case-folded, punctuation dropped, whitespace collapsed."""
    return " ".join(text.casefold().translate(_PUNCT).split())


def similarity(a: str, b: str) -> float:
    """difflib's ratio of the normalised texts, in [0, 1] (1 for two empty texts)."""
    na, nb = normalize(a), normalize(b)
    if not na and not nb:
        return 1.0
    return difflib.SequenceMatcher(None, na, nb, autojunk=False).ratio()


def judge_agreement(spec: AgreementJudge, candidate: str, champion: str) -> PairScore:
    if spec.method == "exact":
        agree, detail = candidate == champion, {}
    elif spec.method == "normalized":
        agree, detail = normalize(candidate) == normalize(champion), {}
    else:
        ratio = similarity(candidate, champion)
        agree, detail = ratio >= spec.threshold, {"similarity": round(ratio, 4)}
    return PairScore(float(agree), 1.0, {"agree": agree, **detail})


# --- llm -------------------------------------------------------------------------------------------------

JUDGE_PROMPT = """You compare two answers to the same request and say which is better.
Rubric: {rubric}

Request:
{request}

Answer A:
{a}

Answer B:
{b}

Reply with exactly one letter: A if answer A is better, B if answer B is better, T if they are equally good.
Verdict:"""

_VERDICT = re.compile(r"\b([ABT])\b")


def verdict(text: str) -> str | None:
    """The judge's verdict in its completion: ``A``, ``B`` or ``T``; None when it named none (counts as a tie)."""
    m = _VERDICT.search(text.strip().upper())
    return m.group(1) if m else None


def judge_llm(spec: LlmJudge, request: str, candidate: str, champion: str, complete: Complete) -> PairScore:
    """Ask the judge with the champion as A and the candidate as B, then (``position_swap``) the other way round;
    a version wins only when every order names it."""
    first = verdict(complete(JUDGE_PROMPT.format(rubric=spec.rubric, request=request, a=champion, b=candidate)))
    winners = [{"A": "champion", "B": "candidate"}.get(first or "", "tie")]
    if spec.position_swap:
        second = verdict(complete(JUDGE_PROMPT.format(rubric=spec.rubric, request=request, a=candidate, b=champion)))
        winners.append({"A": "candidate", "B": "champion"}.get(second or "", "tie"))
    winner = winners[0] if len(set(winners)) == 1 else "tie"
    score = {"champion": (0.0, 1.0), "candidate": (1.0, 0.0), "tie": (0.5, 0.5)}[winner]
    return PairScore(score[0], score[1], {"winner": winner, "verdicts": winners})


# --- one entry point -------------------------------------------------------------------------------------


def judge_pair(
    spec: JudgeSpec, *, request: str, candidate: str, champion: str, complete: Complete | None = None
) -> PairScore:
    """Score one pair under ``spec``. An ``llm`` judge needs ``complete`` (ValueError otherwise)."""
    if spec.checks is not None:
        return judge_checks(spec.checks, candidate, champion)
    if spec.agreement is not None:
        return judge_agreement(spec.agreement, candidate, champion)
    assert spec.llm is not None
    if complete is None:
        raise ValueError(f"the llm judge needs a way to ask {spec.llm.model!r} (complete=)")
    return judge_llm(spec.llm, request, candidate, champion, complete)

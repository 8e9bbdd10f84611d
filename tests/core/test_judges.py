"""Judging pairs of live answers (slipway/judges.py): reference-free checks, agreement with the champion, and an
LLM judge with position swap. The judge model is played by small deterministic functions (test doubles of a
served model: the judge logic is what is under test; tests/serve/test_canary_live.py runs judges on live pairs)."""

from __future__ import annotations

import pytest

from slipway.judges import judge_pair, normalize, similarity, verdict
from slipway.policies.canaryplan import JudgeSpec


def spec(**kw) -> JudgeSpec:
    return JudgeSpec.model_validate(kw)


@pytest.mark.parametrize(
    ("checks", "answer", "failed"),
    [
        ({"valid_json": True}, '{"city": "Lisbon"}', []),
        ({"valid_json": True}, "Lisbon, I think", ["valid_json"]),
        ({"json_schema": {"type": "object", "required": ["city"]}}, '{"city": "Lisbon"}', []),
        ({"json_schema": {"type": "object", "required": ["city"]}}, '{"town": "Lisbon"}', ["json_schema"]),
        ({"json_schema": {"type": "object"}}, "not json", ["valid_json"]),
        ({"refusal": True}, "I can't help with that.", ["refusal"]),
        ({"refusal": True}, "Lisbon.", []),
        ({"min_chars": 3, "max_chars": 10}, "ok", ["min_chars"]),
        ({"min_chars": 3, "max_chars": 10}, "far too long an answer", ["max_chars"]),
        ({"pii": True}, "write to ana@example.com", ["pii"]),
        ({"pii": True, "valid_json": True}, "call 555-123-4567", ["valid_json", "pii"]),
    ],
    ids=[
        "json-ok",
        "json-bad",
        "schema-ok",
        "schema-missing-field",
        "schema-not-json",
        "refusal",
        "no-refusal",
        "too-short",
        "too-long",
        "pii-email",
        "two-failures",
    ],
)
def test_checks_score_each_answer_on_its_own(checks, answer, failed):
    s = judge_pair(spec(checks=checks), request="q", candidate=answer, champion='{"city": "Lisbon"}')
    assert s.detail["candidate_failed"] == failed
    assert s.candidate == float(not failed)


def test_checks_difference_is_champion_minus_candidate():
    j = spec(checks={"valid_json": True})
    assert judge_pair(j, request="q", candidate="nope", champion="{}").difference == 1.0
    assert judge_pair(j, request="q", candidate="{}", champion="nope").difference == -1.0
    assert judge_pair(j, request="q", candidate="{}", champion="[]").difference == 0.0


@pytest.mark.parametrize(
    ("method", "candidate", "champion", "agree"),
    [
        ("exact", "Lisbon.", "Lisbon.", True),
        ("exact", "lisbon", "Lisbon.", False),
        ("normalized", "  lisbon ", "Lisbon.", True),
        ("normalized", "Porto", "Lisbon", False),
        ("similarity", "The capital is Lisbon", "the capital is lisbon!", True),
        ("similarity", "nobsiL si latipac ehT", "The capital is Lisbon", False),
    ],
    ids=["exact-same", "exact-case", "normalized-same", "normalized-other", "similar", "reversed"],
)
def test_agreement_with_the_champion_by_each_method(method, candidate, champion, agree):
    s = judge_pair(spec(agreement={"method": method}), request="q", candidate=candidate, champion=champion)
    assert s.detail["agree"] is agree
    assert s.difference == (0.0 if agree else 1.0)


def test_similarity_threshold_decides_agreement():
    a, b = "the capital of portugal is lisbon", "the capital of portugal is porto"
    ratio = similarity(a, b)
    assert 0.5 < ratio < 0.95
    lax = judge_pair(spec(agreement={"method": "similarity", "threshold": 0.5}), request="", candidate=a, champion=b)
    strict = spec(agreement={"method": "similarity", "threshold": 0.95})
    strict = judge_pair(strict, request="", candidate=a, champion=b)
    assert (lax.detail["agree"], strict.detail["agree"]) == (True, False)
    assert normalize(" A,  b! ") == "a b"


def _judge_preferring(word: str, *, biased_to: str | None = None):
    """A stand-in judge model: prefers the answer containing ``word``; ``biased_to`` ('A' or 'B') answers that
    position whatever it reads (a judge with position bias)."""
    asked = []

    def complete(prompt: str) -> str:
        asked.append(prompt)
        if biased_to:
            return f" {biased_to}"
        a = prompt.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        b = prompt.split("Answer B:\n")[1].split("\n\nReply")[0]
        return " A" if word in a and word not in b else " B" if word in b and word not in a else " T"

    return complete, asked


def test_llm_judge_counts_a_win_only_when_both_orders_agree():
    j = spec(llm={"model": "judge", "rubric": "names the right city"})
    complete, asked = _judge_preferring("Lisbon")
    worse = judge_pair(j, request="capital?", candidate="Porto", champion="Lisbon", complete=complete)
    better = judge_pair(j, request="capital?", candidate="Lisbon", champion="Porto", complete=complete)
    assert (worse.difference, better.difference) == (1.0, -1.0)
    assert worse.detail == {"winner": "champion", "verdicts": ["champion", "champion"]}
    assert len(asked) == 4 and "Rubric: names the right city" in asked[0] and "Request:\ncapital?" in asked[0]


def test_position_swap_turns_a_position_biased_judge_into_ties():
    j = spec(llm={"model": "judge", "rubric": "r"})
    biased, _ = _judge_preferring("x", biased_to="A")
    s = judge_pair(j, request="q", candidate="Porto", champion="Lisbon", complete=biased)
    assert s.difference == 0.0 and s.detail["winner"] == "tie"
    unswapped = spec(llm={"model": "judge", "rubric": "r", "position_swap": False})
    s = judge_pair(unswapped, request="q", candidate="Porto", champion="Lisbon", complete=biased)
    assert s.detail["winner"] == "champion"  # without the swap the bias decides: why it is on by default


def test_a_verdict_is_read_from_the_judges_completion():
    assert [verdict(t) for t in (" A", "b.", "T", "Answer: B", "neither", "")] == ["A", "B", "T", "B", None, None]


def test_the_llm_judge_needs_a_model_to_ask():
    with pytest.raises(ValueError, match="the llm judge needs a way to ask 'judge'"):
        judge_pair(spec(llm={"model": "judge", "rubric": "r"}), request="q", candidate="a", champion="b")

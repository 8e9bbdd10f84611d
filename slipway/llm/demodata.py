"""The generated demo task: read a sentence about a person and return their job and workplace as JSON.

Sentences mention a person, a city, a job and a workplace in many phrasings. The eval split draws names and
cities from pools the train split never uses and adds phrasings train never shows, so a model only scores on
eval by learning *which words fill which field* — names and cities are distractors it has never seen, and
the answer is never the most frequent label. Every dataset is a pure function of the seed.

The text quotes the job and the workplace (``works as a "baker" at the "garage"``): with a byte-level BPE
tokenizer the quoted word is then the same token in the sentence and in the JSON answer (``baker`` after
``Ġ"``), instead of ``Ġbaker`` in running text and ``baker`` after a JSON quote, so the answer can be copied.

Records are ``{"id", "prompt", "completion"}``; a prompt ends with ``JSON:`` and the completion is
`` {"job": "...", "workplace": "..."}``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from typing import Any

PROMPT = "Text: {text}\nJSON:"
FIELDS = ("job", "workplace")

_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m"]
_JOBS = ["nurse", "baker", "pilot", "teacher", "carpenter", "chemist", "painter", "lawyer", "farmer", "tailor"]
_PLACES = ["bakery", "bookshop", "clinic", "workshop", "studio", "cafe", "garage", "library", "school", "market"]
_TEMPLATES = [
    "{name} moved to {city} last year to work as a {job} at the {place}.",
    "Yesterday in {city}, {name}, a {job}, opened a small {place}.",
    "The {job} {name} was born in {city} and now runs the {place}.",
    "After years abroad, {name} returned to {city} as a {job} at the local {place}.",
    "{city} welcomed {name}, a {job}, to its new {place}.",
    "Our {job}, {name}, now lives in {city} near the {place}.",
    "In {city} the {place} where {name} works as a {job} is always busy.",
    "{name} spent the summer in {city} working as a {job} in a {place}.",
]
# Phrasings only the eval split uses: scoring on them needs more than template matching.
_EVAL_TEMPLATES = [
    "Ask anyone in {city}: {name} is the best {job} the {place} ever had.",
    "{name}, {job} by trade, was seen at the {place} in {city} on Monday.",
]
_PRETRAIN_TEMPLATES = [
    "{name} lives in {city}. Everyone in {city} knows {name}.",
    "Profile of {name}. Home town: {city}. Job: {job}. {name} likes the {place}.",
    "{name} ({city}) works at a {place}. Ask {name} about {city}.",
    "We met {name} from {city}, a {job}. Then {name} went back to the {place}.",
]
# The base learns the two skills the task combines, never the task itself: restating a sentence's job and
# workplace in other notations (several, so "after a field's key, copy that word" is the general skill), and
# JSON records of this schema on their own (random values, no sentence). Only fine-tuning data joins them under
# the ``Text: ... JSON:`` prompt.
_FACTS = [
    "{sentence}\nFacts: job = {job} ; workplace = {place}",
    "{sentence}\njob: {job}, workplace: {place}",
    "{sentence}\nWorkplace ({place}), job ({job}).",
    "{sentence}\nname = {name} ; city = {city} ; job = {job}",
    "{sentence}\nCity: {city}. Person: {name}. Place: {place}.",
]
_JSON_DOC = '{{"job": "{job}", "workplace": "{place}"}}'
FACTS_SHARE = 0.75  # share of pre-training documents that restate a sentence's facts (JSON records: 0.1)
_EMAILS = ["{u}@example.com", "{u}.contact@mail.test", "{u}99@corp.example.org"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, n: int) -> str:
    return "".join(_syllable(rng) for _ in range(n)).capitalize()


def _pool(rng: random.Random, n: int, syllables: Sequence[int]) -> list[str]:
    seen: set[str] = set()
    while len(seen) < n:
        seen.add(_word(rng, rng.choice(syllables)))
    return sorted(seen)


class Pools:
    """Disjoint train / held-out pools of first names, last names and cities."""

    def __init__(self, seed: int = 0, *, held_out_fraction: float = 0.25):
        rng = random.Random(f"pools-{seed}")
        self.split: dict[str, dict[str, list[str]]] = {"train": {}, "eval": {}}
        for kind, n, syl in (("first", 240, (2,)), ("last", 240, (2, 3)), ("city", 160, (2, 3))):
            words = _pool(rng, n, syl)
            rng.shuffle(words)
            cut = int(len(words) * held_out_fraction)
            self.split["eval"][kind], self.split["train"][kind] = words[:cut], words[cut:]

    def person(self, rng: random.Random, split: str) -> tuple[str, str]:
        p = self.split[split]
        return f"{rng.choice(p['first'])} {rng.choice(p['last'])}", rng.choice(p["city"])


def _sentence(rng: random.Random, templates: Sequence[str], name: str, city: str) -> str:
    job, place = _q(rng.choice(_JOBS)), _q(rng.choice(_PLACES))
    return rng.choice(templates).format(name=name, city=city, job=job, place=place)


def _q(word: str) -> str:
    """A value as the text quotes it: the same tokens as in the JSON answer, so the model can copy it."""
    return f'"{word}"'


def completion_for(job: str, place: str) -> str:
    return " " + json.dumps({"job": job, "workplace": place})


def make_split(split: str, n: int, *, seed: int = 0, corrupt: bool = False) -> list[dict[str, Any]]:
    """``n`` examples of ``split`` ("train" or "eval"). ``corrupt``: every label names a job and a workplace
    other than those in the text (a wrong-label dataset whose fine-tune must score worse)."""
    pools = Pools(seed)
    rng = random.Random(f"{split}-{seed}")
    templates = _TEMPLATES + _EVAL_TEMPLATES if split == "eval" else _TEMPLATES
    rows = []
    for i in range(n):
        name, city = pools.person(rng, split)
        job, place = rng.choice(_JOBS), rng.choice(_PLACES)
        text = rng.choice(templates).format(name=name, city=city, job=_q(job), place=_q(place))
        if corrupt:
            job = rng.choice([j for j in _JOBS if j != job])
            place = rng.choice([p for p in _PLACES if p != place])
        prompt = PROMPT.format(text=text)
        rows.append({"id": f"{split}-{i:05d}", "prompt": prompt, "completion": completion_for(job, place)})
    return rows


def with_pii_and_nulls(rows: Sequence[dict[str, Any]], *, seed: int = 0) -> list[dict[str, Any]]:
    """A copy of ``rows`` with planted emails, phone numbers and card numbers in some prompts, and null
    completions in a few rows — what a DataSuite must catch before training."""
    rng = random.Random(f"pii-{seed}")
    out = [dict(r) for r in rows]
    for i, r in enumerate(out):
        if i % 23 == 5:
            user = _word(rng, 2).lower()
            r["prompt"] = r["prompt"].replace("\nJSON:", f" Contact: {rng.choice(_EMAILS).format(u=user)}\nJSON:")
        elif i % 31 == 7:
            phone = f"+1 ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}"
            r["prompt"] = r["prompt"].replace("\nJSON:", f" Call {phone}.\nJSON:")
        elif i % 47 == 11:
            card = " ".join(f"{rng.randint(0, 9999):04d}" for _ in range(4))
            r["prompt"] = r["prompt"].replace("\nJSON:", f" Paid with card {card}.\nJSON:")
        elif i % 53 == 13:
            r["completion"] = None
    return out


def pretrain_corpus(n: int = 4000, *, seed: int = 0) -> list[str]:
    """Plain text about people, places and work (train pools plus fresh names, never held-out ones, and never
    the eval-only phrasings): sentences, sentences with a "Facts:" line, and bare JSON records. It never shows
    the task's prompt, nor a sentence followed by its JSON."""
    pools = Pools(seed)
    held_out = {w for ws in pools.split["eval"].values() for w in ws}
    rng = random.Random(f"pretrain-{seed}")
    docs = []
    while len(docs) < n:
        roll = rng.random()
        if roll < 0.1:
            docs.append(_JSON_DOC.format(job=rng.choice(_JOBS), place=rng.choice(_PLACES)))
            continue
        if rng.random() < 0.5:
            name, city = pools.person(rng, "train")
        else:
            first, last, city = _word(rng, 2), _word(rng, rng.choice((2, 3))), _word(rng, rng.choice((2, 3)))
            if {first, last, city} & held_out:
                continue
            name = f"{first} {last}"
        if roll < FACTS_SHARE:
            job, place = rng.choice(_JOBS), rng.choice(_PLACES)
            sentence = rng.choice(_TEMPLATES).format(name=name, city=city, job=_q(job), place=_q(place))
            fact = rng.choice(_FACTS)
            docs.append(fact.format(sentence=sentence, name=name, city=city, job=_q(job), place=_q(place)))
        else:
            docs.append(_sentence(rng, _PRETRAIN_TEMPLATES + _TEMPLATES, name, city))
    return docs


_JSON_RE = re.compile(r"\{.*?\}", re.S)


def parse_extraction(text: str) -> dict[str, Any] | None:
    """The first JSON object in a completion, or None when there is none."""
    m = _JSON_RE.search(text)
    if not m:
        return None
    try:
        value = json.loads(m.group(0))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def score_extraction(outputs: Iterable[str], rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Task metrics over paired outputs and gold rows: ``field_accuracy`` (the task metric: share of fields
    exactly right), ``exact_match`` (all fields right) and ``json_valid``."""
    n = fields = exact = valid = 0
    for out, row in zip(outputs, rows, strict=True):
        gold = json.loads(row["completion"])
        got = parse_extraction(out) or {}
        valid += bool(got)
        hits = sum(got.get(k) == gold[k] for k in FIELDS)
        fields += hits
        exact += hits == len(FIELDS)
        n += 1
    if n == 0:
        return {"field_accuracy": 0.0, "exact_match": 0.0, "json_valid": 0.0, "n": 0}
    return {"field_accuracy": fields / (len(FIELDS) * n), "exact_match": exact / n, "json_valid": valid / n, "n": n}

"""Running an EvalSuite against a target: a model in this process, or any OpenAI-compatible endpoint."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from slipway.metrics import BUILTIN, MetricError, resolve_custom
from slipway.policies.evalsuite import EvalSuite, GenerationParams, MetricSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    reference: Any
    record: Mapping[str, Any]


@dataclass(frozen=True)
class Generated:
    text: str
    completion_tokens: int
    latency_ms: float


class Target(Protocol):
    """Something that completes prompts: ``generate`` and, when it can, ``log_likelihood``."""

    name: str

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generated]: ...

    def log_likelihood(self, prompts: Sequence[str], references: Sequence[str], batch_size: int) -> list[float]: ...


@dataclass
class InProcessTarget:
    """A loaded ``transformers`` model and tokenizer; generation is batched with left padding."""

    name: str
    model: Any
    tokenizer: Any

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generated]:
        from slipway.llm.generate import generate

        out: list[Generated] = []
        for i in range(0, len(prompts), params.batch_size):
            chunk = prompts[i : i + params.batch_size]
            t = time.perf_counter()
            completions = generate(
                self.model,
                self.tokenizer,
                chunk,
                max_new_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                batch_size=len(chunk),
                stop=params.stop,
                seed=params.seed,
            )
            per = (time.perf_counter() - t) * 1000 / len(chunk)
            out += [Generated(c.text, c.completion_tokens, per) for c in completions]
        return out

    def log_likelihood(self, prompts: Sequence[str], references: Sequence[str], batch_size: int) -> list[float]:
        """Mean log-probability per reference token, given the prompt (teacher forcing)."""
        import torch

        tok = self.tokenizer
        device = next(self.model.parameters()).device
        result: list[float] = []
        for i in range(0, len(prompts), batch_size):
            ids, labels = [], []
            for p, r in zip(prompts[i : i + batch_size], references[i : i + batch_size], strict=True):
                p_ids = tok(p, add_special_tokens=False)["input_ids"]
                r_ids = tok(str(r), add_special_tokens=False)["input_ids"]
                ids.append(p_ids + r_ids)
                labels.append([-100] * len(p_ids) + r_ids)
            width = max(len(x) for x in ids)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
            attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            lab = torch.tensor([[-100] * (width - len(x)) + x for x in labels], device=device)
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
            target = lab[:, 1:]
            logp = torch.log_softmax(logits, dim=-1)
            mask = target != -100
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            per = picked.sum(-1) / mask.sum(-1).clamp(min=1)
            result += [float(x) for x in per.cpu()]
        return result


@dataclass
class OpenAITarget:
    """Any OpenAI-compatible endpoint (slipway's gateway, or an external provider used as a baseline)."""

    name: str
    base_url: str
    model: str
    api_key: str = "none"
    concurrency: int = 8
    _client: Any = field(default=None, repr=False)

    def _api(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=2)
        return self._client

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generated]:
        client = self._api()

        def one(prompt: str) -> Generated:
            t = time.perf_counter()
            r = client.completions.create(
                model=self.model,
                prompt=prompt,
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=params.stop or None,
                seed=params.seed,
            )
            text = r.choices[0].text
            tokens = r.usage.completion_tokens if r.usage else len(text.split())
            return Generated(text, tokens, (time.perf_counter() - t) * 1000)

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, prompts))

    def log_likelihood(self, prompts: Sequence[str], references: Sequence[str], batch_size: int) -> list[float]:
        raise MetricError(f"log_likelihood / perplexity need the model in process; {self.name} is an endpoint")


def load_examples(suite: EvalSuite, *, limit: int | None = None) -> tuple[list[Example], str]:
    from slipway.datasets import resolve

    ds = resolve(suite.dataset)
    rows, digest = ds.rows(), ds.digest
    n = min(x for x in (limit, suite.limit, len(rows)) if x is not None)
    examples = []
    for i, row in enumerate(rows[:n]):
        try:
            prompt = suite.prompt_template.format(**row)
        except KeyError as e:
            raise MetricError(f"{suite.name}: example {i + 1} has no field {e} used by prompt_template") from e
        if suite.reference_field not in row:
            raise MetricError(f"{suite.name}: example {i + 1} has no reference field {suite.reference_field!r}")
        ex_id = str(row.get(suite.id_field, i)) if suite.id_field else str(i)
        examples.append(Example(ex_id, prompt, row[suite.reference_field], row))
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise MetricError(f"{suite.name}: example ids in field {suite.id_field!r} are not unique")
    return examples, digest


@dataclass
class SuiteResult:
    suite: str
    target: str
    rows: list[dict[str, Any]]  # {"example_id", "output", "scores"}
    aggregates: dict[str, float]
    seconds: float

    def scores(self) -> dict[str, dict[str, float]]:
        return {r["example_id"]: r["scores"] for r in self.rows}


def metric_properties(suite: EvalSuite) -> tuple[dict[str, bool], dict[str, bool]]:
    """(binary, higher_is_better) per metric name of the suite."""
    binary, higher = {}, {}
    for m in suite.metrics:
        info = BUILTIN.get(m.name) if m.uses is None else None
        binary[m.name] = m.binary if m.binary is not None else bool(info and info.binary)
        higher[m.name] = (
            m.higher_is_better if m.higher_is_better is not None else (info.higher_is_better if info else True)
        )
    return binary, higher


def run_suite(
    target: Target, suite: EvalSuite, examples: Sequence[Example], progress: Callable[[int, int], None] | None = None
) -> SuiteResult:
    """Generate every example's output with ``target`` and score it with every metric of ``suite``."""
    t0 = time.perf_counter()
    prompts = [e.prompt for e in examples]
    outputs: list[Generated] = []
    step = max(suite.generation.batch_size, 1)
    for i in range(0, len(prompts), step):
        outputs += target.generate(prompts[i : i + step], suite.generation)
        if progress:
            progress(min(i + step, len(prompts)), len(prompts))
    needs_ll = any(m.name in ("log_likelihood", "perplexity") and m.uses is None for m in suite.metrics)
    ll = (
        target.log_likelihood(prompts, [str(e.reference) for e in examples], suite.generation.batch_size)
        if needs_ll
        else None
    )
    scorers = _scorers(suite.metrics)
    rows = []
    for i, (ex, out) in enumerate(zip(examples, outputs, strict=True)):
        scores: dict[str, float] = {}
        for spec, fn in scorers:
            if spec.name == "log_likelihood" and spec.uses is None:
                scores[spec.name] = ll[i]  # type: ignore[index]
            elif spec.name == "perplexity" and spec.uses is None:
                scores[spec.name] = float(np.exp(-ll[i]))  # type: ignore[index]
            else:
                try:
                    scores[spec.name] = float(
                        fn(
                            out.text,
                            ex.record,
                            reference=_as_text(ex.reference),
                            completion_tokens=out.completion_tokens,
                            latency=out.latency_ms,
                            **spec.params(),
                        )
                    )
                except Exception as e:  # a custom metric's bug must name the metric and the example
                    raise MetricError(f"metric {spec.name!r} failed on example {ex.id}: {e}") from e
        rows.append({"example_id": ex.id, "output": out.text, "scores": scores})
    aggregates = aggregate(rows)
    return SuiteResult(suite.name, target.name, rows, aggregates, time.perf_counter() - t0)


def _as_text(ref: Any) -> str:
    return ref if isinstance(ref, str) else json.dumps(ref)


def _scorers(specs: Iterable[MetricSpec]) -> list[tuple[MetricSpec, Callable[..., float]]]:
    out = []
    for spec in specs:
        if spec.uses:
            out.append((spec, resolve_custom(spec.uses)))
        else:
            fn = BUILTIN[spec.name].func
            out.append((spec, fn if fn is not None else (lambda *a, **k: 0.0)))
    return out


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of each metric over the examples that have it."""
    sums: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r["scores"].items():
            sums.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in sorted(sums.items())}

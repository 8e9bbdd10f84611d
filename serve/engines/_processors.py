"""Per-request sampling parameters for the ``hf`` engine, applied inside transformers' continuous batch.

transformers' continuous batching samples every request of a step at once, with per-request temperature and top-p
(its ``ContinuousBatchingLogitsProcessor`` classes). This module adds one processor of the same kind, first in the
manager's list (before temperature, so a greedy request with penalties takes the argmax of its penalised logits),
for what vLLM's sampling parameters add (``protocol.SAMPLING_PARAMS``):

- ``presence_penalty``, ``frequency_penalty`` (generated tokens) and ``repetition_penalty`` (prompt and generated
  tokens), as vLLM defines them; ``logit_bias`` (token id → -100..100); ``min_tokens`` (end of sequence masked until
  then); ``top_k``; ``min_p`` (on the probabilities at the request's temperature, as vLLM);
- ``seed`` (of a sampled request): its tokens are drawn from a generator of its own, so the same seed gives the
  same answer whatever shares the batch;
- ``ignore_eos``: the request is added without an end-of-sequence token, so it runs to ``max_tokens``;
- ``response_format`` ``json_object`` / ``json_schema``: an xgrammar matcher per request masks the tokens the
  grammar does not allow and is advanced with every token the request generates; once the JSON is complete the
  grammar allows only the end-of-sequence token, which ends the request.

The processor keeps its per-request state in a table keyed by request id (the engine registers a request before
adding it and releases it when it ends). A step without such a request costs one empty-table check. Both of the
processor's calls run on the manager's thread, one after the other: ``prepare_tensor_args`` catches each request up
with the tokens it generated since the last step (the manager updates them between steps, so this needs
transformers' synchronous batching), ``__call__`` edits the logits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from slipway.serve.engines.base import EngineError, EngineRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """One request's parameters beyond temperature and top-p, validated (:func:`parse`). Defaults change nothing."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    top_k: int = 0  # 0: all tokens
    min_p: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: tuple[str, str] | None = None  # ("json_object", "") or ("json_schema", the schema as JSON)
    seed: int | None = None  # a sampled request draws its tokens from its own generator (see RequestSampling.draw)

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise EngineError(400, f"{name} must be a number, not {value!r}", param=name)
    if value > hi or value < lo or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise EngineError(400, f"{name}={value!r} is out of range {bound}", param=name)
    return float(value)


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EngineError(400, f"{name} must be an integer, not {value!r}", param=name)
    if not lo <= value <= hi:
        raise EngineError(400, f"{name}={value!r} is out of range [{lo}, {hi}]", param=name)
    return value


def parse(extra: Mapping[str, Any], *, vocab_size: int, max_tokens: int) -> SamplingParams | None:
    """The request's :class:`SamplingParams`, or None when it asks for nothing beyond temperature and top-p.

    Raises :class:`EngineError` 400 naming the parameter: a value out of vLLM's (or OpenAI's) range, a
    ``logit_bias`` token id outside the model's vocabulary, ``min_tokens`` above ``max_tokens``, a
    ``response_format`` that is neither ``text``, ``json_object`` nor ``json_schema`` with a ``schema`` object.
    The schema itself is checked when it is compiled (:meth:`Grammars.compile`)."""
    kw: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty"):
        if extra.get(name) is not None:
            kw[name] = _number(name, extra[name], -2.0, 2.0)
    if extra.get("repetition_penalty") is not None:
        kw["repetition_penalty"] = _number("repetition_penalty", extra["repetition_penalty"], 0.0, 2.0, lo_open=True)
    if extra.get("top_k") is not None:
        top_k = _integer("top_k", extra["top_k"], -1, vocab_size)
        kw["top_k"] = max(top_k, 0)  # -1 and 0 both mean every token (vLLM)
    if extra.get("min_p") is not None:
        kw["min_p"] = _number("min_p", extra["min_p"], 0.0, 1.0)
    if extra.get("min_tokens") is not None:
        kw["min_tokens"] = _integer("min_tokens", extra["min_tokens"], 0, max_tokens)
    if extra.get("ignore_eos") is not None:
        if not isinstance(extra["ignore_eos"], bool):
            raise EngineError(400, f"ignore_eos must be true or false, not {extra['ignore_eos']!r}", param="ignore_eos")
        kw["ignore_eos"] = extra["ignore_eos"]
    if extra.get("logit_bias"):
        kw["logit_bias"] = _logit_bias(extra["logit_bias"], vocab_size)
    if extra.get("response_format") is not None:
        kw["grammar"] = _grammar_spec(extra["response_format"])
    params = SamplingParams(**kw)
    return None if params == SamplingParams() else params


def _logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if not isinstance(value, Mapping):
        raise EngineError(400, f"logit_bias must map token ids to biases, not {value!r}", param="logit_bias")
    out = []
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise EngineError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise EngineError(
                400,
                f"logit_bias: token id {token} is not in this model's vocabulary [0, {vocab_size})",
                param="logit_bias",
            )
        out.append((token, _number(f"logit_bias[{key!r}]", bias, -100.0, 100.0)))
    return tuple(sorted(out))


def _grammar_spec(value: Any) -> tuple[str, str] | None:
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_object", "")
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise EngineError(
                400,
                "response_format: json_schema needs a JSON schema object under json_schema.schema",
                param="response_format",
            )
        return ("json_schema", json.dumps(schema, sort_keys=True))
    raise EngineError(
        400,
        f"response_format: type must be 'text', 'json_object' or 'json_schema', not {kind!r}",
        param="response_format",
    )


class Grammars:
    """xgrammar's compiler for one tokenizer, built on the first structured request (xgrammar is imported then)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos: int) -> None:
        self.tok, self.vocab_size, self.eos = tokenizer, vocab_size, eos
        self._compiler: Any = None
        self._lock = threading.Lock()

    def compile(self, spec: tuple[str, str]) -> Any:
        """The compiled grammar; 400 naming ``response_format`` when the schema is not one xgrammar can compile."""
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tok, vocab_size=self.vocab_size, stop_token_ids=self.eos)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        kind, schema = spec
        try:
            if kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            # compact JSON: whitespace between tokens is a way for a small model to never finish
            return self._compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError / InvalidJSONError for a bad schema
            why = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
            raise EngineError(
                400,
                f"response_format: the JSON schema cannot be used: {why or type(e).__name__}",
                param="response_format",
            ) from e


class RequestSampling:
    """A running request's state: its parameters, what it has generated, its grammar matcher."""

    def __init__(
        self, params: SamplingParams, prompt: list[int], temperature: float, grammar: Any, top_p: float = 1.0
    ) -> None:
        self.params, self.prompt, self.temperature, self.top_p = params, prompt, temperature, top_p
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.matcher: Any = None
        if grammar is not None:
            import xgrammar as xgr

            self.matcher = xgr.GrammarMatcher(grammar)
        self.seen = 0  # generated tokens caught up with
        self.new: list[int] = []  # generated tokens not yet counted (counted on the logits' device)
        self.counts: torch.Tensor | None = None  # per token: times generated
        self.in_prompt: torch.Tensor | None = None  # per token: in the prompt

    @property
    def ignores_eos(self) -> bool:
        """Added without an end-of-sequence token (a grammar still ends with one)."""
        return self.params.ignore_eos and self.matcher is None

    def catch_up(self, state: Any) -> None:
        """Take in the tokens generated since the last step (``state`` is transformers' RequestState; a request the
        manager soft-reset keeps its earlier tokens at the end of ``initial_tokens``)."""
        before = state.initial_tokens[state._true_initial_tokens :] if state._true_initial_tokens else []
        total = len(before) + len(state.generated_tokens)
        if total <= self.seen:
            return
        tokens = (before + state.generated_tokens)[self.seen :] if before else state.generated_tokens[self.seen :]
        self.seen = total
        if self.params.penalised:
            self.new.extend(tokens)
        if self.matcher is not None:
            for t in tokens:
                if not self.matcher.is_terminated() and not self.matcher.accept_token(t):
                    log.warning("the grammar matcher rejected token %d", t)

    def apply(self, row: torch.Tensor, eos: int, bitmask: torch.Tensor | None) -> None:
        """Edit one request's logits in place, in vLLM's order: grammar, logit bias, min_tokens, penalties, top-k,
        min-p."""
        p = self.params
        if self.matcher is not None and bitmask is not None and not self.matcher.is_terminated():
            import xgrammar as xgr

            self.matcher.fill_next_token_bitmask(bitmask, 0)
            xgr.apply_token_bitmask_inplace(row.unsqueeze(0), bitmask.to(row.device), vocab_size=row.size(-1))
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=row.device)
            row.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], device=row.device, dtype=row.dtype))
        if p.min_tokens and self.seen < p.min_tokens and eos >= 0:
            row[eos] = -math.inf
        if p.penalised:
            self._penalise(row)
        if p.top_k:
            kth = torch.topk(row, min(p.top_k, row.size(-1))).values[-1]
            row.masked_fill_(row < kth, -math.inf)
        if p.min_p and self.temperature > 0:
            probs = torch.softmax(row / self.temperature, dim=-1)
            row.masked_fill_(probs < p.min_p * probs.max(), -math.inf)
        if self.generator is not None:
            self.draw(row)

    def draw(self, row: torch.Tensor) -> None:
        """A seeded request's token, drawn here from its own generator at its temperature and top-p, and the row
        made one-hot so the batch's own sampling (which draws from one generator for every request) can only pick
        it. The same seed gives the same tokens whatever else shares the batch (up to the float differences of
        other batch shapes, as in vLLM)."""
        probs = torch.softmax(row.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(ordered, dim=-1) - ordered > self.top_p  # keep the smallest set reaching top_p
            probs[order[outside]] = 0.0
        token = int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
        row.fill_(-math.inf)
        row[token] = 0.0

    def _penalise(self, row: torch.Tensor) -> None:
        p = self.params
        if self.counts is None:
            self.counts = torch.zeros_like(row)
            self.in_prompt = torch.zeros(row.size(-1), dtype=torch.bool, device=row.device)
            self.in_prompt[torch.tensor(self.prompt, dtype=torch.long, device=row.device)] = True
        if self.new:
            ids = torch.tensor(self.new, dtype=torch.long, device=row.device)
            self.counts.index_add_(0, ids, torch.ones(len(self.new), dtype=row.dtype, device=row.device))
            self.new.clear()
        generated = self.counts > 0
        if p.repetition_penalty != 1.0:
            assert self.in_prompt is not None
            seen = generated | self.in_prompt
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalised, row))
        if p.frequency_penalty:
            row.sub_(p.frequency_penalty * self.counts)
        if p.presence_penalty:
            row.sub_(p.presence_penalty * generated.to(row.dtype))


class RequestProcessor(ContinuousBatchingLogitsProcessor):
    """The manager's first logits processor: applies each registered request's :class:`RequestSampling`."""

    supported_kwargs: dict[str, type] = {}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, table: dict[str, RequestSampling], eos: int, vocab_size: int) -> None:
        self.table, self.eos, self.vocab_size = table, eos, vocab_size
        self._rows: list[tuple[int, RequestSampling]] = []
        self._zeros = torch.zeros(0, dtype=torch.int32)
        self._bitmask: torch.Tensor | None = None

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        rows = []
        if self.table:
            for i, future in enumerate(requests_with_new_token):
                sampling = self.table.get(future.state.request_id)
                if sampling is not None:
                    sampling.catch_up(future.state)
                    rows.append((i, sampling))
        self._rows = rows
        n = len(requests_with_new_token)
        if self._zeros.numel() < n:
            self._zeros = torch.zeros(max(n, 64), dtype=torch.int32)
        return self._zeros[:n]  # the state lives here, not in the manager's argument tensor

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return scores
        for i, sampling in self._rows:
            bitmask = None
            if sampling.matcher is not None:
                if self._bitmask is None:
                    import xgrammar as xgr

                    self._bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
                bitmask = self._bitmask
            sampling.apply(scores[i], self.eos, bitmask)
        return scores


class Sampling:
    """The engine's side: requests are admitted (:meth:`admit`), registered in :attr:`table` by request id while
    they run, and each new manager gets a processor over the same table (:meth:`install`)."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos: int) -> None:
        self.vocab_size, self.eos = vocab_size, eos
        self.grammars = Grammars(tokenizer, vocab_size, eos)
        self.table: dict[str, RequestSampling] = {}

    async def admit(self, req: EngineRequest, prompt: list[int]) -> RequestSampling | None:
        """The request's sampling state, or None when it asks for nothing beyond temperature and top-p; 400 naming
        the parameter for a bad one (a schema is compiled off the event loop)."""
        params = parse(dict(req.extra), vocab_size=self.vocab_size, max_tokens=req.max_tokens)
        if req.seed is not None and req.temperature > 0:  # a greedy request needs no seed
            params = dataclasses.replace(params or SamplingParams(), seed=int(req.seed))
        if params is None:
            return None
        grammar = None
        if params.grammar is not None:
            grammar = await asyncio.to_thread(self.grammars.compile, params.grammar)
        return RequestSampling(params, prompt, req.temperature, grammar, req.top_p)

    def install(self, manager: Any) -> None:
        """Put a processor over :attr:`table` first in ``manager``'s logits processors (before temperature). Call
        it before the manager's loop starts: the loop sizes its argument tensor from the processors' count."""
        procs = manager.logit_processor
        procs.logits_processor.insert(0, RequestProcessor(self.table, self.eos, self.vocab_size))
        procs.tensors_required += 1
        procs.do_processing = True

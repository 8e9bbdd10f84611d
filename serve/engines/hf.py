"""``hf``: a transformers causal LM on transformers' own continuous batching.

One persistent manager per replica (``model.init_continuous_batching``) runs the decode loop in a thread; every
request, streamed or not, is added to it and joins the running batch at the next step, and leaves it when it
finishes. Results come back through result handlers on the replica's event loop (registered before the request
is added). What the manager does not do is done here:

- **lengths** are checked before a request is added (a prompt plus its ``max_tokens`` beyond the model's
  positions or the KV cache fails every in-flight request of the manager): 413, neighbours undisturbed;
- **stop strings** are applied on the consumer side, then the request is cancelled in the engine;
- **deadlines** cancel the request in the engine (504), as does a client that goes away;
- **per-request sampling**: the manager samples with per-request temperature and top-p processors; greedy
  requests run at a temperature of 1e-7, which makes the softmax one-hot (their output equals ``generate``'s
  greedy output token for token, tested); vLLM's penalties, top-k, min-p, min_tokens, ignore_eos, logit_bias and
  JSON output (xgrammar) are one more per-request processor ahead of temperature (:mod:`._processors`);
- **LoRA adapters** per request (``EngineRequest.adapter``), in the same batch as base requests: loaded and
  unloaded at runtime between two steps (:meth:`HFEngine.load_adapter`), applied to each request's own token rows
  (:mod:`._adapters`);
- **a dead manager** (its loop failed) answers its in-flight requests with 500s, and the next request starts a
  new one (``restarts`` counts them);
- **shutdown**: the manager's thread is a daemon and :meth:`close` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from slipway.serve.engines._adapters import Adapters
from slipway.serve.engines._processors import Sampling
from slipway.serve.engines._scoring import Scorer, ScoreState, embed
from slipway.serve.engines.base import Delta, EngineError, EngineRequest, Finish, StopScanner, TokenizedEngine

log = logging.getLogger(__name__)

GREEDY_TEMPERATURE = 1e-7  # logits / 1e-7: the softmax is one-hot, so sampling picks the argmax
_POLL_S = 0.5  # how often a waiting request checks that the manager is alive
MAX_LOGPROBS = 20  # alternatives per token at most (vLLM's default max_logprobs)


class HFEngine(TokenizedEngine):
    """Continuous batching over one loaded model. ``max_seqs`` requests at most per step, ``max_batch_tokens``
    tokens at most per step (prefill chunks and decodes), a KV cache of ``kv_cache_tokens`` tokens in pages of
    ``page_size``."""

    name = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_seqs: int = 32,
        max_batch_tokens: int = 512,
        kv_cache_tokens: int | None = None,
        page_size: int = 64,
        max_new_tokens: int = 256,
        prefix_caching: bool = True,
    ) -> None:
        super().__init__(tokenizer)
        self.model = model
        self.max_seqs, self.max_batch_tokens, self.page_size = max_seqs, max_batch_tokens, page_size
        self.max_new_tokens, self.prefix_caching = max_new_tokens, prefix_caching
        positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.kv_cache_tokens = kv_cache_tokens
        limits = [x for x in (positions, kv_cache_tokens) if x]
        self.max_total_tokens = min(limits) if limits else None
        self.eos = tokenizer.eos_token_id
        self._mgr: Any = None
        self._lock = threading.Lock()
        self._streamed: dict[str, bool] = {}  # request id → streamed by its client (counts mixed steps)
        self._closed = False
        self._step_size = 0  # requests in the last engine step
        self._scorer: Scorer | None = None  # logprobs, for the requests that ask (see _scoring)
        self._model_lock = threading.Lock()
        self.adapters = Adapters(model, self._model_lock)  # LoRA adapters per request, in the same batch
        self._adapter_scorers: dict[str, Scorer] = {}
        vocab = model.config.get_text_config().vocab_size
        self.sampling = Sampling(tokenizer, vocab_size=vocab, eos=self.eos)  # penalties, top-k, JSON... (_processors)
        self._start()

    # ------------------------------------------------------------------ manager lifecycle

    def _start(self) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        gen = GenerationConfig(
            do_sample=True,  # per request: sampled, or greedy through GREEDY_TEMPERATURE
            temperature=0.5,  # defaults only; a processor exists for each so requests can set their own
            top_p=0.5,
            top_k=0,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos,
            pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos,
        )
        cb: dict[str, Any] = {
            "max_batch_tokens": self.max_batch_tokens,
            "max_requests_per_batch": self.max_seqs,
            "page_size": self.page_size,
            "per_request_processors": True,
            "allow_block_sharing": self.prefix_caching,
            # self.sampling's processor reads each request's tokens on the host before every step: no batch may be
            # prepared before the last one's tokens are known (async batching), nor replayed from a graph (what
            # transformers turns on with flash attention on a GPU; on CPU both are off anyway)
            "use_async_batching": False,
            "use_cuda_graph": False,
        }
        if self.kv_cache_tokens:
            cb["num_blocks"] = math.ceil(self.kv_cache_tokens / self.page_size)
        mgr = self.model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**cb)
        )
        inner_step = mgr._generation_step

        def counted_step() -> None:  # runs on the manager's thread: one forward pass of the running batch
            reqs = mgr.batch_processor.inputs_and_outputs.requests_in_batch
            kinds = {self._streamed.get(r.state.request_id, False) for r in reqs}
            t0 = time.perf_counter()
            with self._model_lock:  # the scorer's forward passes take turns with the batch's (see _scoring)
                self.adapters.route(reqs)  # which token rows use which adapter (see _adapters)
                try:
                    inner_step()
                finally:
                    self.adapters.clear()
            self._step_size = len(reqs)
            self.counters.step(len(reqs), len(kinds) > 1, time.perf_counter() - t0)

        mgr._generation_step = counted_step
        self.sampling.install(mgr)
        self.adapters.install(mgr)
        _start_daemon(mgr)
        self._mgr = mgr

    def _running(self) -> Any:
        """The live manager, after starting a new one if the last one died."""
        with self._lock:
            if self._closed:
                raise EngineError(503, "the engine is shutting down")
            mgr = self._mgr
            if _alive(mgr):
                return mgr
            err = getattr(mgr.background_thread_status, "fatal_error", None) if mgr is not None else None
            log.error("continuous batching manager stopped (%s); starting a new one", err)
            if mgr is not None:
                try:
                    mgr.stop(block=True, timeout=5)
                except Exception:  # a dead manager may not stop cleanly; a new one replaces it anyway
                    log.exception("stopping the dead manager failed")
            self.counters.restarts += 1
            self._start()
            return self._mgr

    def reconfigure(self, *, max_seqs: int | None = None, **_: Any) -> None:
        """Most requests per step, changed in place (``control.reconfigure``'s ``max_batch_size``)."""
        if max_seqs is not None:
            self.max_seqs = int(max_seqs)
            sched = getattr(getattr(self._mgr, "batch_processor", None), "scheduler", None)
            if sched is not None:
                sched.max_requests_per_batch = self.max_seqs
            if self._mgr is not None:
                self._mgr.continuous_batching_config.max_requests_per_batch = self.max_seqs

    # ------------------------------------------------------------------ adapters

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Load the PEFT LoRA adapter saved at ``path`` under ``name``; requests naming it (``EngineRequest.adapter``)
        run in the same batch as the others. The manager keeps running and the requests in flight are undisturbed.
        Returns the adapter's entry in ``stats()["adapters"]``. Raises :class:`EngineError` 409 (name taken), 400
        (an adapter this engine cannot serve; see :mod:`._adapters`)."""
        info = await asyncio.to_thread(self.adapters.load, name, path)
        log.info("adapter %r loaded from %s (rank %d, %d layers)", name, path, info.rank, info.layers)
        return info.as_dict(0)

    async def unload_adapter(self, name: str, *, timeout_s: float | None = None) -> None:
        """Unload adapter ``name``: new requests for it are refused (404) at once, the ones in flight finish, then
        its layers are removed. Raises 404 when it is not loaded, 409 when ``timeout_s`` passes before its requests
        have finished (it is then served again)."""
        self.adapters.start_unload(name)
        stop = None if timeout_s is None else time.monotonic() + timeout_s
        while self.adapters.in_flight(name):
            if stop is not None and time.monotonic() > stop:
                self.adapters.cancel_unload(name)
                raise EngineError(409, f"adapter {name!r} still has requests in flight", param="model")
            await asyncio.sleep(0.02)
        await asyncio.to_thread(self.adapters.finish_unload, name)
        self._adapter_scorers.pop(name, None)
        log.info("adapter %r unloaded", name)

    def healthy(self) -> bool:
        return self._closed or _alive(self._mgr)

    def revive(self) -> None:
        with contextlib.suppress(EngineError):  # closed: nothing to revive
            self._running()

    def close_now(self) -> None:
        with self._lock:
            self._closed = True
            if self._mgr is not None and self._mgr.is_running():
                self._mgr.stop(block=True, timeout=10)

    # ------------------------------------------------------------------ requests

    async def submit(self, req: EngineRequest) -> AsyncIterator[Delta | Finish]:
        ids = self.prompt_ids(req)
        self.check_length(len(ids), req.max_tokens)
        sampling = await self.sampling.admit(req, ids)  # a bad parameter is a 400 before the request joins the batch
        score = self._score_state(req, len(ids))
        mgr = self._running()
        rid = f"{req.request_id}-{uuid.uuid4().hex[:8]}"
        if req.adapter is not None:
            self.adapters.admit(req.adapter, rid)  # 404 for an adapter that is not loaded
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sampled = req.temperature > 0
        scanner = StopScanner(req.stop)
        self._streamed[rid] = req.stream
        self.counters.requests += 1
        mgr.register_result_handler(rid, queue.put_nowait)
        done, shared = False, 0
        try:
            if req.echo:
                yield Delta(req.prompt, 0, await self._logprobs(score, ids, None, req.adapter))
            if sampling is not None:
                self.sampling.table[rid] = sampling
            added = mgr.add_request(
                ids,
                request_id=rid,
                max_new_tokens=req.max_tokens,
                streaming=req.stream or bool(scanner.stop),  # stop strings are looked for token by token
                eos_token_id=-1 if sampling is not None and sampling.ignores_eos else None,
                temperature=req.temperature if sampled else GREEDY_TEMPERATURE,
                top_p=req.top_p if sampled else 1.0,
            )
            if added is None:
                raise EngineError(503, "the engine is not accepting requests (stopping)")
            while True:
                out = await self._next(queue, mgr, req)
                while not queue.empty() and not out.is_finished():  # behind: outputs are cumulative, take the last
                    out = queue.get_nowait()
                shared = max(shared, self._step_size)
                if out.error is not None or int(out.status) == _FAILED:
                    done = True
                    self.counters.failed += 1
                    raise EngineError(500, f"the engine failed: {out.error or 'unknown error'}")
                tokens = list(out.generated_tokens)
                eos = bool(tokens) and tokens[-1] == self.eos and not (sampling is not None and sampling.ignores_eos)
                if eos:
                    tokens = tokens[:-1]
                finished = out.is_finished()
                text = self.tok.decode(tokens, skip_special_tokens=True)
                new, stopped = scanner.feed(text, final=finished)
                lp = None
                if score is not None:
                    upto = self._covered(tokens, scanner, stopped or finished)
                    lp = await self._logprobs(score, ids + tokens, upto, req.adapter)
                if new or lp:
                    yield Delta(new, len(tokens), lp)
                if stopped or finished:
                    done = finished
                    self.counters.finished += 1
                    reason = "stop" if (stopped or eos or len(tokens) < req.max_tokens) else "length"
                    yield Finish(reason, len(ids), len(tokens), shared or None)
                    return
        finally:
            self._streamed.pop(rid, None)
            self.sampling.table.pop(rid, None)
            if not done:  # stopped by a stop string, past its deadline, or its client went away: free its slot
                with mgr.output_router._lock:
                    mgr.output_router.result_handlers.pop(rid, None)
                mgr.cancel_request(rid)
                self.counters.cancelled += 1
            if req.adapter is not None:
                self.adapters.release(req.adapter, rid, finished=done)

    def _score_state(self, req: EngineRequest, n_prompt: int) -> ScoreState | None:
        """Scoring of a request that asks for logprobs (``logprobs``: k for completions; ``logprobs: true`` with
        ``top_logprobs``: k for chat), or None. 400 beyond :data:`MAX_LOGPROBS` alternatives."""
        extra = dict(req.extra)
        if "top_logprobs" in extra or extra.get("logprobs") is True:
            top = int(extra.get("top_logprobs") or 0)
        elif extra.get("logprobs") not in (None, False):
            top = int(extra["logprobs"])
        else:
            return None
        if not 0 <= top <= MAX_LOGPROBS:
            raise EngineError(
                400, f"logprobs: at most {MAX_LOGPROBS} alternatives per token, not {top}", param="logprobs"
            )
        if req.adapter is not None:  # the adapter's own logprobs: the scorer's passes route every row to it
            if req.adapter not in self._adapter_scorers and req.adapter in self.adapters.loaded:
                lock: Any = self.adapters.scoring_lock(req.adapter)
                self._adapter_scorers[req.adapter] = Scorer(self.model, self.tok, lock)
        elif self._scorer is None:
            self._scorer = Scorer(self.model, self.tok, self._model_lock)
        return ScoreState(first=0 if req.echo else n_prompt, top=top)

    async def _logprobs(
        self, score: ScoreState | None, ids: list[int], upto: int | None, adapter: str | None = None
    ) -> dict[str, Any] | None:
        """The logprobs of the tokens of ``ids`` not reported yet, ``upto`` that many (all when None), computed
        off the event loop (with ``adapter``'s scorer for an adapter request)."""
        if score is None:
            return None
        scorer = self._scorer if adapter is None else self._adapter_scorers[adapter]
        assert scorer is not None  # made by _score_state with the request's ScoreState
        await asyncio.to_thread(scorer.feed, score, ids)
        if upto is not None:
            upto -= score.reported
            score.reported += max(upto, 0)
        return scorer.take(score, upto)

    def _covered(self, tokens: list[int], scanner: StopScanner, ended: bool) -> int:
        """How many generated tokens the text released so far covers: all of them without stop strings; with
        them, those wholly released (and at the end, the one a stop string cut into)."""
        if not scanner.stop:
            return len(tokens)
        for k in range(len(tokens) + 1):
            size = len(self.tok.decode(tokens[:k], skip_special_tokens=True))
            if size >= scanner.sent:
                return k if (ended or size == scanner.sent) else k - 1
        return len(tokens)

    async def embed(self, inputs: list[list[Any]], *, deadline: float | None = None) -> list[list[float]]:
        """Last-token embeddings, normalised (see :func:`._scoring.embed`), computed between the batch's steps."""
        left = None if deadline is None else deadline - time.time()
        try:
            return await asyncio.wait_for(asyncio.to_thread(embed, self.model, inputs, self._model_lock), left)
        except TimeoutError:
            raise EngineError(504, "the embeddings ran past the request's deadline") from None

    async def _next(self, queue: asyncio.Queue[Any], mgr: Any, req: EngineRequest) -> Any:
        """The request's next output; 504 past its deadline, 500 when the manager died without answering it."""
        while True:
            left = req.time_left()
            if left is not None and left <= 0:
                self.counters.timed_out += 1
                raise EngineError(504, "the request ran past its deadline in the engine")
            try:
                return await asyncio.wait_for(queue.get(), min(_POLL_S, left) if left is not None else _POLL_S)
            except TimeoutError:
                if not mgr.is_running() and queue.empty():
                    self.counters.failed += 1
                    raise EngineError(500, "the engine stopped before answering the request") from None

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        mgr = self._mgr
        bp = getattr(mgr, "batch_processor", None)
        sched = getattr(bp, "scheduler", None)
        s.update(
            active=len(getattr(sched, "active_requests", {}) or {}),
            waiting=len(getattr(sched, "waiting_requests", {}) or {}),
            max_seqs=self.max_seqs,
            max_batch_tokens=self.max_batch_tokens,
            kv_cache_tokens=self.kv_cache_tokens,
            max_total_tokens=self.max_total_tokens,
            running=bool(mgr is not None and mgr.is_running()),
            adapters=self.adapters.stats(),
        )
        return s


def _alive(mgr: Any) -> bool:
    """The manager's loop runs and takes requests: not dead, and not on its way out after a fatal error (its
    thread lives a moment after it has failed its requests)."""
    return mgr is not None and mgr.is_running() and mgr.background_thread_status.can_accept_new_requests() is None


def _status_failed() -> int:
    from transformers.generation.continuous_batching.requests import RequestStatus

    return int(RequestStatus.FAILED)


_FAILED = _status_failed()


def _start_daemon(mgr: Any) -> None:
    """``mgr.start()`` with the loop on a daemon thread: a replica's process must exit even if nobody stops it
    (transformers starts a non-daemon thread)."""
    import torch

    mgr.background_thread_status.clear()
    mgr._generation_thread = threading.Thread(
        target=mgr._run_generation_loop,
        kwargs={"use_inference_mode": torch.is_inference_mode_enabled()},
        name="slipway-cb",
        daemon=True,
    )
    mgr._generation_thread.start()

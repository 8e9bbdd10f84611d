"""``hf`` with ``engine.batching: static``: the model server's batching before continuous batching, kept for
comparison (bench/serve.py measures both in one run) and for workloads where every request arrives at once.

Non-streaming requests wait up to ``batch_wait_timeout_s`` for up to ``max_batch_size`` others; a batch is split
into groups of equal generation parameters and each group is one left-padded ``generate`` call, run inline on
the replica's event loop, until its longest member finishes. Streaming requests decode alone, token by token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from slipway.serve.engines.base import Delta, EngineError, EngineRequest, Finish, StopScanner, TokenizedEngine

log = logging.getLogger(__name__)


class HFStaticEngine(TokenizedEngine):
    name = "hf-static"

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        super().__init__(tokenizer)
        self.model = model
        self.device = next(model.parameters()).device
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.max_total_tokens = positions
        self._queue: asyncio.Queue[tuple[EngineRequest, asyncio.Future[Any]]] | None = None
        self._task: asyncio.Task[None] | None = None

    def reconfigure(self, *, max_seqs: int | None = None, batch_wait_timeout_s: float | None = None) -> None:
        if max_seqs is not None:
            self.max_batch_size = int(max_seqs)
        if batch_wait_timeout_s is not None:
            self.batch_wait_timeout_s = float(batch_wait_timeout_s)

    async def submit(self, req: EngineRequest) -> AsyncIterator[Delta | Finish]:
        self.refuse_adapter(req)
        if req.extra:  # the engine-specific parameters are the continuous engine's (serve/engines/_processors.py)
            raise EngineError(
                400,
                f"{req.extra[0][0]} is not supported by the hf engine's static batching (engine.batching: static); "
                "the continuous batching engine honours it",
                param=req.extra[0][0],
            )
        if req.seed is not None and req.temperature > 0:  # one generate samples a whole batch from one generator
            raise EngineError(
                400,
                "seed is not supported by the hf engine's static batching (engine.batching: static); "
                "the continuous batching engine honours it",
                param="seed",
            )
        n_prompt = len(self.prompt_ids(req))
        self.check_length(n_prompt, req.max_tokens)
        self.counters.requests += 1
        if req.echo:
            yield Delta(req.prompt, 0)
        if req.stream:
            async for item in self._stream(req, n_prompt):
                yield item
            return
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._batcher())
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put((req, fut))
        out = await fut
        if out.get("text"):
            yield Delta(out["text"], out["completion_tokens"])
        self.counters.finished += 1
        yield Finish(out["finish_reason"], out["prompt_tokens"], out["completion_tokens"], out["batch_size"])

    async def _batcher(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            until = loop.time() + self.batch_wait_timeout_s
            while len(batch) < self.max_batch_size:
                left = until - loop.time()
                try:
                    item = self._queue.get_nowait() if left <= 0 else await asyncio.wait_for(self._queue.get(), left)
                    batch.append(item)
                except (TimeoutError, asyncio.QueueEmpty):
                    break
            self._run(batch)

    def _run(self, batch: list[tuple[EngineRequest, asyncio.Future[Any]]]) -> None:
        from slipway.llm.generate import generate

        size, now = len(batch), time.time()
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (r, fut) in enumerate(batch):
            if r.deadline and r.deadline < now:
                self.counters.timed_out += 1
                fut.set_exception(EngineError(504, "request timed out in the model server's queue"))
                continue
            groups[(r.max_tokens, r.temperature, r.top_p if r.temperature > 0 else 1.0, r.stop)].append(i)
        for (max_tokens, temperature, top_p, stop), idx in groups.items():
            t0 = time.perf_counter()
            try:
                outs: list[Any] = generate(
                    self.model,
                    self.tok,
                    [batch[i][0].prompt for i in idx],
                    max_new_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    batch_size=len(idx),
                    stop=list(stop),
                    seed=batch[idx[0]][0].seed,
                )
            except Exception as e:  # one bad group must not fail the other groups of the batch
                log.exception("generation failed")
                outs = [e] * len(idx)
            self.counters.step(len(idx), False, time.perf_counter() - t0)
            for i, o in zip(idx, outs, strict=True):
                fut = batch[i][1]
                if fut.done():
                    continue
                if isinstance(o, Exception):
                    self.counters.failed += 1
                    fut.set_exception(EngineError(500, f"generation failed: {type(o).__name__}"))
                else:
                    fut.set_result(
                        {
                            "text": o.text,
                            "prompt_tokens": o.prompt_tokens,
                            "completion_tokens": o.completion_tokens,
                            "finish_reason": o.finish_reason,
                            "batch_size": size,
                        }
                    )

    async def _stream(self, req: EngineRequest, n_prompt: int) -> AsyncIterator[Delta | Finish]:
        import torch

        ids = self.tok(req.prompt, return_tensors="pt")["input_ids"].to(self.device)
        past, step_input, generated = None, ids, []
        scanner = StopScanner(req.stop)
        reason, cut = "length", False
        for _ in range(req.max_tokens):
            left = req.time_left()
            if left is not None and left <= 0:
                self.counters.timed_out += 1
                raise EngineError(504, "the request ran past its deadline in the engine")
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if req.temperature > 0:
                probs = torch.softmax(logits / req.temperature, dim=-1)
                if req.top_p < 1.0:
                    sp, si = torch.sort(probs, descending=True)
                    keep = torch.cumsum(sp, 0) - sp < req.top_p
                    probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
                nxt = int(torch.multinomial(probs / probs.sum(), 1))
            else:
                nxt = int(torch.argmax(logits))
            self.counters.step(1, False, time.perf_counter() - t0)
            if nxt == self.tok.eos_token_id:
                reason = "stop"
                break
            generated.append(nxt)
            new, cut = scanner.feed(self.tok.decode(generated, skip_special_tokens=True))
            if new:
                yield Delta(new, len(generated))
            if cut:
                reason = "stop"
                break
            step_input = torch.tensor([[nxt]], device=self.device)
            await asyncio.sleep(0)  # let the replica's event loop serve other requests between tokens
        if not cut:  # release what was held back (a partial character or stop string)
            new, _ = scanner.feed(self.tok.decode(generated, skip_special_tokens=True), final=True)
            if new:
                yield Delta(new, len(generated))
        self.counters.finished += 1
        yield Finish(reason, n_prompt, len(generated), 1)

"""The model server: one live version of a model as a Ray Serve deployment with batched generation.

Requests from the gateway are dicts (``prompt`` or ``messages``, ``max_tokens``, ``temperature``, ``top_p``,
``stop``, ``deadline``). Non-streaming requests go through ``@serve.batch``: a batch is split into groups of
compatible generation parameters and each group is one left-padded ``generate`` call, run inline on the
replica's event loop (a thread executor starves batch formation through the GIL). Streaming requests decode
token by token with the KV cache, yielding after every token.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from slipway.policies.servingconfig import ServingConfig

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ModelServer"


def app_name(model: str, version: int) -> str:
    """The Serve application of one live version."""
    return f"{model}-v{version}"


class _Backend:
    """What generates text; ``hf`` runs a causal LM, ``echo`` repeats the prompt (no weights, no compute)."""

    def count(self, text: str) -> int:
        raise NotImplementedError

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def generate(self, prompts: list[str], *, max_tokens: int, temperature: float, top_p: float, stop, seed):
        raise NotImplementedError

    async def stream(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float, stop):
        raise NotImplementedError
        yield


class EchoBackend(_Backend):
    def count(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompts, *, max_tokens, temperature, top_p, stop, seed):
        return [self._answer(p, max_tokens) for p in prompts]

    def _answer(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        words = prompt.split() or ["echo"]
        out = [words[i % len(words)] for i in range(max_tokens)]
        return {
            "text": " " + " ".join(out),
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": len(out),
            "finish_reason": "length",
        }

    async def stream(self, prompt, *, max_tokens, temperature, top_p, stop):
        ans = self._answer(prompt, max_tokens)
        for n, word in enumerate(ans["text"].split(" ")[1:], start=1):
            yield " " + word, n
            await asyncio.sleep(0)


class HFBackend(_Backend):
    def __init__(self, uri: str, sha256: str | None, device: str | None, dtype: str | None) -> None:
        from slipway.llm.checkpoint import load_causal_lm

        self.model, self.tok = load_causal_lm(uri, device=device, dtype=dtype, sha256=sha256)
        self.device = next(self.model.parameters()).device

    def count(self, text: str) -> int:
        return len(self.tok(text)["input_ids"])

    def render_chat(self, messages):
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return super().render_chat(messages)

    def generate(self, prompts, *, max_tokens, temperature, top_p, stop, seed):
        from slipway.llm.generate import generate

        outs = generate(
            self.model,
            self.tok,
            prompts,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            batch_size=len(prompts),
            stop=stop,
            seed=seed,
        )
        return [
            {
                "text": o.text,
                "prompt_tokens": o.prompt_tokens,
                "completion_tokens": o.completion_tokens,
                "finish_reason": o.finish_reason,
            }
            for o in outs
        ]

    async def stream(self, prompt, *, max_tokens, temperature, top_p, stop):
        import torch

        ids = self.tok(prompt, return_tensors="pt")["input_ids"].to(self.device)
        past = None
        step_input = ids
        generated: list[int] = []
        emitted = ""
        eos = self.tok.eos_token_id
        for _ in range(max_tokens):
            with torch.inference_mode():
                out = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:
                    sp, si = torch.sort(probs, descending=True)
                    keep = torch.cumsum(sp, 0) - sp < top_p
                    probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
                nxt = int(torch.multinomial(probs / probs.sum(), 1))
            else:
                nxt = int(torch.argmax(logits))
            if nxt == eos:
                break
            generated.append(nxt)
            text = self.tok.decode(generated, skip_special_tokens=True)
            cut = min((text.index(s) for s in stop if s and s in text), default=None)
            if cut is not None:
                yield text[len(emitted) : cut], len(generated)
                return
            if len(text) > len(emitted) and not text.endswith("\ufffd"):
                yield text[len(emitted) :], len(generated)
                emitted = text
            step_input = torch.tensor([[nxt]], device=self.device)
            await asyncio.sleep(0)  # let the replica's event loop serve other requests between tokens
        tail = self.tok.decode(generated, skip_special_tokens=True)[len(emitted) :]
        yield tail, len(generated)


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64, health_check_period_s=5)
class ModelServer:
    """One live version. Built by :func:`slipway.serve.control.deploy_version`; reached by the gateway."""

    async def __init__(
        self,
        model: str,
        version: int,
        config: dict[str, Any],
        uri: str | None = None,
        sha256: str | None = None,
        follow_store: bool = True,
    ) -> None:
        self.model, self.version = model, version
        self.cfg = ServingConfig.model_validate(config)
        device = self.cfg.device
        if device is None and self.cfg.ray_actor_options.num_gpus > 0:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.cfg.backend == "echo":
            self.backend: _Backend = EchoBackend()
        else:
            if not uri:
                raise ValueError(f"{model}:{version}: the hf backend needs an artifact uri")
            self.backend = HFBackend(uri, sha256, device, self.cfg.dtype)
        self.started = time.monotonic()
        self.first_fault_at: float | None = None  # wall clock of the first injected fault (chaos benches)
        self.batches = 0
        self.batched_requests = 0
        self.largest_batch = 0
        self.recent_batches: deque[int] = deque(maxlen=64)  # sizes of the last batches (info, benches)
        self.busy_s = 0.0  # seconds spent generating (utilisation = its growth over wall time)
        self._healthy = True
        self.batch_settings: dict[str, Any] = {}
        self.reconfigure(self.cfg.batch_settings())
        self._follow: asyncio.Task[None] | None = None
        if follow_store:
            self._follow = asyncio.get_running_loop().create_task(self._follow_store())

    async def _follow_store(self) -> None:
        """Apply batch-setting changes made with ``control.reconfigure`` on every replica (a handle call
        would reach one replica; a ``serve.run`` would restart them all)."""
        from slipway.serve.store import get_store

        store, rev = get_store(), -1
        while True:
            try:
                rev, table = await store.wait.remote(rev, 30.0)
                cfg = table.get(self.model, {}).get("config")
                if cfg:
                    self.reconfigure(ServingConfig.model_validate(cfg).batch_settings())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("weight store unreachable; retrying")
                await asyncio.sleep(1.0)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply new batch settings in place (Serve calls this on a ``user_config`` change; no restart)."""
        if "max_batch_size" in user_config:
            self._batch.set_max_batch_size(int(user_config["max_batch_size"]))
            self.batch_settings["max_batch_size"] = int(user_config["max_batch_size"])
        if "batch_wait_timeout_s" in user_config:
            self._batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
            self.batch_settings["batch_wait_timeout_s"] = float(user_config["batch_wait_timeout_s"])

    def check_health(self) -> None:
        if not self._healthy:
            raise RuntimeError(f"{self.model}:{self.version} is unhealthy")

    def info(self) -> dict[str, Any]:
        import os

        import ray

        ctx = ray.get_runtime_context()
        return {
            "model": self.model,
            "version": self.version,
            "backend": self.cfg.backend,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "first_fault_at": self.first_fault_at,
            "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
            **self.batch_settings,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
            "largest_batch": self.largest_batch,
            "recent_batches": list(self.recent_batches),
            "busy_s": self.busy_s,
        }

    def _prepare(self, req: dict[str, Any]) -> tuple[str, int] | dict[str, Any]:
        prompt = req.get("prompt")
        if prompt is None:
            prompt = self.backend.render_chat(req["messages"])
        n = self.backend.count(prompt)
        if n > self.cfg.max_prompt_tokens:
            return _error(413, f"prompt has {n} tokens; {self.model} accepts at most {self.cfg.max_prompt_tokens}")
        return prompt, n

    async def _fault(self) -> dict[str, Any] | None:
        """The configured fault, if this request is to suffer it (chaos testing)."""
        f = self.cfg.fault_injection
        if f is None or time.monotonic() - self.started < f.after_s:
            return None
        if f.extra_latency_ms:
            await asyncio.sleep(f.extra_latency_ms / 1000.0)
        if f.error_rate and random.random() < f.error_rate:
            if self.first_fault_at is None:
                self.first_fault_at = time.time()
            return _error(500, f"{self.model}:{self.version}: injected fault")
        return None

    async def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        """Complete one request (batched with others). Errors come back as ``{"error": {status, message}}``."""
        fault = await self._fault()
        if fault is not None:
            return fault
        prepared = self._prepare(req)
        if isinstance(prepared, dict):
            return prepared
        req = {**req, "prompt": prepared[0], "n_prompt": prepared[1]}
        out = await self._batch(req)
        f = self.cfg.fault_injection
        started = f is not None and time.monotonic() - self.started >= f.after_s
        if started and random.random() < f.wrong_answer_rate:  # chaos: a fluent-looking wrong answer, status 200
            out = {**out, "text": out["text"][::-1]}
        return {**out, "version": self.version}

    async def generate_many(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Complete several requests sent as one call (the gateway coalesces concurrent requests)."""
        outs = await asyncio.gather(*(self.generate(r) for r in reqs), return_exceptions=True)
        return [
            o if isinstance(o, dict) else _error(500, f"generation failed: {type(o).__name__}")
            for o in outs  # one request's failure must not fail the others sent with it
        ]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)
    async def _batch(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        size = len(reqs)
        self.batches += 1
        self.batched_requests += size
        self.largest_batch = max(self.largest_batch, size)
        self.recent_batches.append(size)
        results: list[dict[str, Any] | None] = [None] * size
        now = time.time()
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(reqs):
            if r.get("deadline") and r["deadline"] < now:
                results[i] = _error(504, "request timed out in the model server's queue")
                continue
            temp = float(r.get("temperature", 0.0))
            key = (
                int(r["max_tokens"]),
                temp,
                float(r.get("top_p", 1.0)) if temp > 0 else 1.0,
                tuple(r.get("stop") or ()),
            )
            groups[key].append(i)
        for (max_tokens, temperature, top_p, stop), idx in groups.items():
            seed = reqs[idx[0]].get("seed")
            t0 = time.perf_counter()
            try:
                outs = self.backend.generate(
                    [reqs[i]["prompt"] for i in idx],
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    stop=list(stop),
                    seed=seed,
                )
            except Exception as e:  # one bad group must not fail the other groups of the batch
                log.exception("generation failed")
                outs = [_error(500, f"generation failed: {type(e).__name__}")] * len(idx)
            self.busy_s += time.perf_counter() - t0
            for i, o in zip(idx, outs, strict=True):
                results[i] = {**o, "batch_size": size}
        return results  # type: ignore[return-value]

    async def stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield ``{"delta": text}`` per token, then one ``{"done": ..., usage}`` item."""
        fault = await self._fault()
        if fault is not None:
            yield fault
            return
        prepared = self._prepare(req)
        if isinstance(prepared, dict):
            yield prepared
            return
        prompt, n_prompt = prepared
        n_tokens = 0
        async for delta, n_so_far in self.backend.stream(
            prompt,
            max_tokens=int(req["max_tokens"]),
            temperature=float(req.get("temperature", 0.0)),
            top_p=float(req.get("top_p", 1.0)),
            stop=list(req.get("stop") or ()),
        ):
            n_tokens = n_so_far
            if delta:
                yield {"delta": delta}
        yield {
            "done": True,
            "finish_reason": "length" if n_tokens >= int(req["max_tokens"]) else "stop",
            "prompt_tokens": n_prompt,
            "completion_tokens": n_tokens,
            "version": self.version,
            "batch_size": 1,
        }


def _error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message}}


def build(args: dict[str, Any]) -> Any:
    """Application builder for ``serve deploy``/KubeRay: ``import_path: slipway.serve.model_server:build`` with
    args ``{model, version, config, uri, sha256}`` (what ``slipway serve config`` writes)."""
    cfg = ServingConfig.model_validate(args["config"])
    return ModelServer.options(**cfg.deployment_options()).bind(
        args["model"], int(args["version"]), cfg.model_dump(mode="json"), args.get("uri"), args.get("sha256")
    )

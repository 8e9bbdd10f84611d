"""The model server: one live version of a model as a Ray Serve deployment around one engine.

Requests from the gateway are dicts (``prompt`` or ``messages``, ``max_tokens``, ``temperature``, ``top_p``,
``stop``, ``seed``, ``deadline``). The engine (:mod:`slipway.serve.engines`, chosen by ``ServingConfig.backend``)
does the batching: with ``hf`` every request, streamed or not, joins the running batch at the next decode step.
A non-streaming answer is the engine's token stream collected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from slipway.policies.servingconfig import FaultInjection, ServingConfig
from slipway.serve.engines import Delta, Engine, EngineError, build_engine, engine_request, merge_logprobs

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ModelServer"


def app_name(model: str, version: int) -> str:
    """The Serve application of one live version."""
    return f"{model}-v{version}"


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
        provider: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.version = model, version
        self.cfg = ServingConfig.model_validate(config)
        device = self.cfg.device
        if device is None and self.cfg.ray_actor_options.num_gpus > 0:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine: Engine = build_engine(self.cfg, uri=uri, sha256=sha256, device=device, provider=provider)
        # a provider applies its chat template upstream: it gets a chat's messages as they were sent
        self.remote_chat = self.cfg.backend == "provider"
        self.started = time.monotonic()
        self.first_fault_at: float | None = None  # wall clock of the first injected fault (chaos benches)
        self._healthy = True
        self.batch_settings: dict[str, Any] = {}
        self.reconfigure(self.cfg.batch_settings())
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.adapters: dict[str, int] = {}  # adapter versions this replica's engine holds: name -> version
        self.adapter_faults: dict[str, tuple[Any, float]] = {}  # name -> (its fault injection, loaded at)
        self._follow: asyncio.Task[None] | None = None
        if follow_store:
            if self.cfg.adapters.enabled:  # the live adapters are loaded before the replica takes any traffic
                from slipway.serve.store import get_store

                _rev, table = await get_store().snapshot.remote()
                await self._sync_adapters(table)
            self._follow = asyncio.get_running_loop().create_task(self._follow_store())

    def __del__(self) -> None:
        close = getattr(getattr(self, "engine", None), "close_now", None)
        if close is not None:  # Serve calls __del__ on a replica it stops: end the engine's thread
            close()

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
                if self.cfg.adapters.enabled:
                    await self._sync_adapters(table)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("weight store unreachable; retrying")
                await asyncio.sleep(1.0)

    async def _sync_adapters(self, table: dict[str, Any]) -> None:
        """Make the engine hold exactly the adapter versions the weight store lists on this replica's application
        (live or draining): unload the removed ones (after their requests finish), load the new ones. An adapter
        whose artifact fails its sha256 check (or that the engine cannot serve) is never loaded: the version is
        reported failed, which takes it out of traffic on every gateway."""
        from slipway.llm.checkpoint import local_dir
        from slipway.serve.store import get_store

        entry = table.get(self.model)
        if entry is None:  # a restarted store knows nothing until a gateway restores it: keep what is loaded
            return
        mine, store = app_name(self.model, self.version), get_store()
        want: dict[str, tuple[int, dict[str, Any]]] = {}
        faults: dict[str, Any] = {}
        for v, e in entry["versions"].items():
            spec = e.get("adapter")
            if spec and e["app"] == mine and e["state"] in ("live", "draining"):
                want[spec["name"]] = (int(v), spec)
                faults[spec["name"]] = spec.get("fault_injection")
        for name, version in list(self.adapters.items()):
            if name not in want:
                await self.engine.unload_adapter(name)  # new requests refused, those in flight finish first
                del self.adapters[name]
                self.adapter_faults.pop(name, None)
                await store.adapter_unloaded.remote(self.model, version, self.replica)
        for name, (version, spec) in want.items():
            if name in self.adapters:
                continue
            try:
                path = await asyncio.to_thread(local_dir, spec["uri"], sha256=spec.get("sha256"))
                await self.engine.load_adapter(name, str(path))
            except Exception as e:
                reason = f"{self.model}:{version} adapter {spec['uri']} refused: {type(e).__name__}: {e}"
                log.error("%s", reason)
                await store.adapter_failed.remote(self.model, version, reason)
                continue
            self.adapters[name] = version
            if faults.get(name):  # a rollback drill of an adapter candidate: its requests alone suffer the fault
                self.adapter_faults[name] = (FaultInjection.model_validate(faults[name]), time.monotonic())
            await store.adapter_loaded.remote(self.model, version, self.replica, os.getpid())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply new batch settings in place (Serve calls this on a ``user_config`` change; no restart)."""
        changes: dict[str, Any] = {}
        if "max_batch_size" in user_config:
            changes["max_seqs"] = self.batch_settings["max_batch_size"] = int(user_config["max_batch_size"])
        if "batch_wait_timeout_s" in user_config:
            wait = self.batch_settings["batch_wait_timeout_s"] = float(user_config["batch_wait_timeout_s"])
            changes["batch_wait_timeout_s"] = wait
        reconf = getattr(self.engine, "reconfigure", None)
        if reconf is not None:
            reconf(**changes)

    def check_health(self) -> None:
        if not self._healthy:
            raise RuntimeError(f"{self.model}:{self.version} is unhealthy")
        if not self.engine.healthy():  # a dead engine loop is replaced before the next request needs it
            self.engine.revive()

    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "model": self.model,
            "version": self.version,
            "backend": self.cfg.backend,
            "replica": self.replica,
            "adapters": dict(self.adapters),
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "first_fault_at": self.first_fault_at,
            "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
            **self.batch_settings,
            "engine": self.engine.stats(),
            # the engine's steps under the names the benches read: a step is one batch of the running requests
            "batches": self.engine.counters.steps,
            "batched_requests": self.engine.counters.stepped_requests,
            "largest_batch": self.engine.counters.largest_step,
            "recent_batches": list(self.engine.counters.recent_steps),
            "busy_s": self.engine.counters.busy_s,
        }

    def _prepare(self, req: dict[str, Any]) -> tuple[str, list[Any]] | dict[str, Any]:
        """The rendered prompt and its tokens (tokenized once: the engine reuses them), or a 413."""
        prompt = req.get("prompt")
        if isinstance(prompt, list):  # token ids
            ids = list(prompt)
            try:
                self.engine.check_ids(ids)
            except EngineError as e:
                return _error(e.status, str(e), e.param)
            prompt = self.engine.decode(ids)
        else:
            if prompt is None:
                prompt = self.engine.render_chat(req["messages"])
            ids = self.engine.encode(prompt)
        if len(ids) > self.cfg.max_prompt_tokens:
            n, most = len(ids), self.cfg.max_prompt_tokens
            return _error(413, f"prompt has {n} tokens; {self.model} accepts at most {most}")
        return prompt, ids

    def _messages(self, req: dict[str, Any]) -> list[dict[str, Any]] | None:
        """A chat's messages for an engine that templates upstream (a provider); None for the others."""
        return req.get("messages") if self.remote_chat and req.get("prompt") is None else None

    def _fault_of(self, adapter: str | None) -> tuple[Any, float]:
        """The fault injection a request is subject to and when its clock started: an adapter version's own (its
        candidate config in the weight store, from when this replica loaded it), else this replica's."""
        if adapter and adapter in self.adapter_faults:
            return self.adapter_faults[adapter]
        return self.cfg.fault_injection, self.started

    async def _fault(self, adapter: str | None = None) -> dict[str, Any] | None:
        """The configured fault, if this request is to suffer it (chaos testing)."""
        f, started = self._fault_of(adapter)
        if f is None or time.monotonic() - started < f.after_s:
            return None
        if f.extra_latency_ms:
            await asyncio.sleep(f.extra_latency_ms / 1000.0)
        if f.error_rate and random.random() < f.error_rate:
            if self.first_fault_at is None:
                self.first_fault_at = time.time()
            version = self.adapters.get(adapter or "", self.version)
            return _error(500, f"{self.model}:{version}: injected fault")
        return None

    async def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        """Complete one request (in the engine's running batch): one answer, or ``choices`` when it asks for
        ``n`` > 1 or a list of ``prompts`` (each choice its own engine request, all in the running batch). Errors
        come back as ``{"error": {status, message}}``."""
        subs = fan_out(req)
        if subs is None:
            return await self._generate_one(req)
        outs = await asyncio.gather(*(self._generate_one(sub) for sub in subs))
        failed = next((o for o in outs if "error" in o), None)
        return failed if failed is not None else merge_choices(outs, int(req.get("n") or 1))

    async def _generate_one(self, req: dict[str, Any]) -> dict[str, Any]:
        fault = await self._fault(req.get("adapter"))
        if fault is not None:
            return fault
        prepared = self._prepare(req)
        if isinstance(prepared, dict):
            return prepared
        rid = req.get("request_id") or uuid.uuid4().hex
        ereq = engine_request(
            req, prepared[0], stream=False, request_id=rid, prompt_ids=prepared[1], messages=self._messages(req)
        )
        parts: list[str] = []
        logprobs: dict[str, Any] | None = None
        try:
            async for item in self.engine.submit(ereq):
                if isinstance(item, Delta):
                    parts.append(item.text)
                    logprobs = merge_logprobs(logprobs, item.logprobs)
                    continue
                out = {
                    "text": "".join(parts),
                    "prompt_tokens": item.prompt_tokens,
                    "completion_tokens": item.completion_tokens,
                    "finish_reason": item.finish_reason,
                    "batch_size": item.batch_size,
                }
                if logprobs is not None:
                    out["logprobs"] = logprobs
                break
            else:
                return _error(500, "the engine ended the request without an answer")
        except EngineError as e:
            return _engine_error(e)
        except Exception as e:
            log.exception("generation failed")
            return _error(500, f"generation failed: {type(e).__name__}")
        f, since = self._fault_of(req.get("adapter"))
        started = f is not None and time.monotonic() - since >= f.after_s
        if started and random.random() < f.wrong_answer_rate:  # chaos: a fluent-looking wrong answer, status 200
            out = {**out, "text": out["text"][::-1]}
        return {**out, "version": self.adapters.get(req.get("adapter") or "", self.version)}

    async def embed(self, req: dict[str, Any]) -> dict[str, Any]:
        """Embeddings of ``req["inputs"]`` (texts or token lists): ``{embeddings, prompt_tokens, version}``, or an
        error answer (the engine's 400 when it does not embed, 413 for an input past ``max_prompt_tokens``)."""
        if req.get("adapter"):  # the engine embeds with the base's layers only: never the base's vectors instead
            return _error(400, f"{self.model}: an adapter version does not embed", "model")
        fault = await self._fault()
        if fault is not None:
            return fault
        ids_list = []
        for item in req["inputs"]:
            prepared = self._prepare({"prompt": item})
            if isinstance(prepared, dict):
                return prepared
            ids_list.append(prepared[1])
        try:
            vectors = await self.engine.embed(ids_list, deadline=req.get("deadline"))
        except EngineError as e:
            return _engine_error(e)
        except Exception as e:
            log.exception("embedding failed")
            return _error(500, f"embedding failed: {type(e).__name__}")
        return {"embeddings": vectors, "prompt_tokens": sum(len(i) for i in ids_list), "version": self.version}

    async def generate_many(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Complete several requests sent as one call (the gateway coalesces concurrent requests)."""
        outs = await asyncio.gather(*(self.generate(r) for r in reqs), return_exceptions=True)
        return [
            o if isinstance(o, dict) else _error(500, f"generation failed: {type(o).__name__}")
            for o in outs  # one request's failure must not fail the others sent with it
        ]

    async def stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield ``{"delta": text}`` as the engine generates, then one ``{"done": ..., usage}`` item. A request for
        several choices (``n``, ``prompts``) yields its choices' items as they come, each with its ``index``, a
        ``{"index", "finish_reason"}`` item as each choice ends, and one ``done`` item with the usage of all."""
        subs = fan_out(req)
        if subs is None:
            async for item in self._stream_one(req):
                yield item
            return
        async for item in self._stream_many(subs, int(req.get("n") or 1)):
            yield item

    async def _stream_many(self, subs: list[dict[str, Any]], n: int) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()

        async def pump(index: int, sub: dict[str, Any]) -> None:
            gen = self._stream_one(sub)
            try:
                async for item in gen:
                    await queue.put((index, item))
            finally:
                await gen.aclose()

        tasks = [asyncio.create_task(pump(i, sub)) for i, sub in enumerate(subs)]
        finals: dict[int, dict[str, Any]] = {}
        try:
            while len(finals) < len(subs):
                index, item = await queue.get()
                if "error" in item:
                    yield item
                    return
                if "done" in item:
                    finals[index] = item
                    yield {"index": index, "finish_reason": item["finish_reason"]}
                    continue
                yield {**item, "index": index}
            yield {"done": True, **merge_choices([finals[i] for i in range(len(subs))], n)}
        finally:
            for task in tasks:  # a client gone, or one choice failed: cancel the others in the engine
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream_one(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        fault = await self._fault(req.get("adapter"))
        if fault is not None:
            yield fault
            return
        prepared = self._prepare(req)
        if isinstance(prepared, dict):
            yield prepared
            return
        rid = req.get("request_id") or uuid.uuid4().hex
        ereq = engine_request(
            req, prepared[0], stream=True, request_id=rid, prompt_ids=prepared[1], messages=self._messages(req)
        )
        gen = self.engine.submit(ereq)
        every, held, held_lp, sent_at = self.cfg.engine.stream_interval, [], None, None
        try:
            async for item in gen:
                if isinstance(item, Delta):
                    if item.text:
                        held.append(item.text)
                    held_lp = merge_logprobs(held_lp, item.logprobs)
                    if (held or held_lp) and (sent_at is None or item.completion_tokens - sent_at >= every):
                        yield {"delta": "".join(held)} | ({"logprobs": held_lp} if held_lp else {})
                        held, held_lp, sent_at = [], None, item.completion_tokens
                    continue
                if held or held_lp:
                    yield {"delta": "".join(held)} | ({"logprobs": held_lp} if held_lp else {})
                yield {
                    "done": True,
                    "finish_reason": item.finish_reason,
                    "prompt_tokens": item.prompt_tokens,
                    "completion_tokens": item.completion_tokens,
                    "version": self.adapters.get(req.get("adapter") or "", self.version),
                    "batch_size": item.batch_size,
                }
                return
        except EngineError as e:
            yield _engine_error(e)
        except Exception as e:
            log.exception("streaming generation failed")
            yield _error(500, f"generation failed: {type(e).__name__}")
        finally:
            await gen.aclose()  # a client gone mid-stream cancels the request in the engine


def fan_out(req: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One request per choice (``n`` for each prompt of ``prompts``, prompt-major as OpenAI numbers them), or
    None for a request of one choice. Choice ``i`` of a seeded request samples with ``seed + i``: reproducible,
    and its choices differ."""
    n, prompts = int(req.get("n") or 1), req.get("prompts")
    if n == 1 and prompts is None:
        return None
    base = {k: v for k, v in req.items() if k not in ("n", "prompts")}
    rid, seed = req.get("request_id") or uuid.uuid4().hex, req.get("seed")
    subs = []
    for j, prompt in enumerate(prompts if prompts is not None else [None]):
        for i in range(n):
            sub = dict(base, request_id=f"{rid}-{j}-{i}", seed=None if seed is None else int(seed) + i)
            if prompt is not None:
                sub["prompt"] = prompt
            subs.append(sub)
    return subs


def merge_choices(outs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The answer of a request of several choices, from each choice's answer (in :func:`fan_out`'s order): the
    choices, and usage as OpenAI counts it — each prompt's tokens once, every choice's completion tokens."""
    first = outs[0]
    return {
        "choices": [
            {"index": i, "text": o.get("text", ""), "finish_reason": o["finish_reason"]}
            | ({"logprobs": o["logprobs"]} if o.get("logprobs") is not None else {})
            for i, o in enumerate(outs)
        ],
        "text": first.get("text", ""),
        "finish_reason": first["finish_reason"],
        "prompt_tokens": sum(o["prompt_tokens"] for o in outs[::n]),
        "completion_tokens": sum(o["completion_tokens"] for o in outs),
        "batch_size": max((o.get("batch_size") or 0 for o in outs), default=0) or None,
        "version": first["version"],
    }


def _error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"status": status, "message": message} | ({"param": param} if param else {})}


def _engine_error(e: EngineError) -> dict[str, Any]:
    """An engine's refusal as an error answer; an upstream's ``Retry-After`` (seconds) goes with it."""
    out = _error(e.status, str(e), e.param)
    retry_after = getattr(e, "retry_after", None)
    if retry_after is not None:
        out["error"]["retry_after"] = retry_after
    return out


def build(args: dict[str, Any]) -> Any:
    """Application builder for ``serve deploy``/KubeRay: ``import_path: slipway.serve.model_server:build`` with
    args ``{model, version, config, uri, sha256}`` (what ``slipway serve config`` writes)."""
    cfg = ServingConfig.model_validate(args["config"])
    return ModelServer.options(**cfg.deployment_options()).bind(
        args["model"],
        int(args["version"]),
        cfg.model_dump(mode="json"),
        args.get("uri"),
        args.get("sha256"),
        True,
        args.get("provider"),
    )

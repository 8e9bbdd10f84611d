"""Dispatch: the replica's routing table, and sending a request to the version chosen for it — alone, coalesced
with concurrent ones into one ``generate_many`` call, streamed, or mirrored to a shadow version.

The routing table comes from the weight store (:mod:`slipway.serve.store`); choosing by weight and picking
shadows are :mod:`slipway.serve.routing`'s pure functions.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from slipway.policies.servingconfig import ServingConfig
from slipway.serve.auth import Principal
from slipway.serve.coalesce import Coalescer
from slipway.serve.errors import (
    BadRequest,
    Overloaded,
    PromptTooLong,
    ServeError,
    UpstreamFailed,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from slipway.serve.pairs import Answer
from slipway.serve.recording import Recorder, Ticket, status_for
from slipway.serve.routing import choose, shadow_targets

#: Who a mirrored request is accounted to (shadows leave no usage row).
SHADOW = Principal(subject="shadow")
#: The model label of a request for a model the table does not know: free-form client input must not become a
#: metric label (unbounded series) or a usage row PostgreSQL may refuse (lone surrogates).
UNKNOWN_MODEL = "(unknown)"
T = TypeVar("T")


@dataclass(frozen=True)
class Route:
    """Where one request goes: a live version of a model, its Serve application and serving config; for an
    adapter version, the application is its base's and ``adapter`` the LoRA adapter its replicas run it with."""

    model: str
    version: str
    app: str
    config: ServingConfig
    adapter: str | None = None

    def payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` as this route's model server takes it: naming the adapter of an adapter version (a shadow
        gets the payload of the request it mirrors, so the adapter is set per route, at sending)."""
        if self.adapter is None:
            return payload
        return {**payload, "adapter": self.adapter}


class RoutingTable:
    """The routing table of one replica: model → parsed config and versions."""

    def __init__(self) -> None:
        self.rev = -1
        self.table: dict[str, dict[str, Any]] = {}
        self.configs: dict[str, ServingConfig] = {}

    def apply(self, rev: int, table: dict[str, Any]) -> None:
        configs = {}
        for model, entry in table.items():
            old = self.table.get(model)
            if old is not None and old["config"] == entry["config"] and model in self.configs:
                configs[model] = self.configs[model]
            else:
                configs[model] = ServingConfig.model_validate(entry["config"])
        self.rev, self.table, self.configs = rev, table, configs

    def label(self, model: str) -> str:
        """``model`` when the table knows it, else :data:`UNKNOWN_MODEL`."""
        return model if model in self.table else UNKNOWN_MODEL

    def route(self, model: str, version: str) -> Route:
        e = self.table[model]["versions"][version]
        return Route(model, version, e["app"], self.configs[model], (e.get("adapter") or {}).get("name"))

    def choose(self, model: str, sticky: str | None, rng: random.Random) -> Route | None:
        """The version serving this request (sticky by ``sticky`` while weights hold), or None when none has weight."""
        version = choose(self.table[model]["versions"], sticky, rng)
        return None if version is None else self.route(model, version)

    def price(self, model: str, version: str | None) -> dict[str, float] | None:
        """A provider version's own per-token price (``{prompt_per_1k, completion_per_1k}``), None for the others."""
        e = self.table.get(model, {}).get("versions", {}).get(version or "")
        return e.get("price") if e else None

    def fallbacks(self, chosen: Route) -> list[Route]:
        """The live versions a request goes on to when ``chosen`` fails, in the order of its config's
        ``fallbacks.order`` (by kind: ``provider`` versions are marked so in the table, the others are
        ``self-hosted``); within a kind the highest weight, then the newest version, first. A tripped version is
        never one."""
        entry = self.table.get(chosen.model)
        order = self.configs[chosen.model].fallbacks.order if entry is not None else []
        out: list[Route] = []
        for kind in order:
            same = [
                (v, e)
                for v, e in entry["versions"].items()
                if v != chosen.version
                and e["state"] == "live"
                and not e.get("tripped")
                and e.get("kind", "self-hosted") == kind
            ]
            same.sort(key=lambda ve: (-float(ve[1].get("weight", 0.0)), -int(ve[0])))
            out += [self.route(chosen.model, v) for v, _e in same]
        return out

    def shadows(self, chosen: Route, rng: random.Random) -> list[Route]:
        """Versions that get a mirrored copy of a request answered by ``chosen``."""
        entry = self.table.get(chosen.model)
        if entry is None:
            return []
        return [self.route(chosen.model, v) for v in shadow_targets(entry["versions"], chosen.version, rng)]


async def await_ref(resp: Any) -> Any:
    """A coroutine awaiting ``resp`` (a Serve response or Ray object ref, which ``create_task`` refuses)."""
    return await resp


def check_answer(out: dict[str, Any]) -> dict[str, Any]:
    """``out``, or the :class:`ServeError` the model server's error answer stands for."""
    err = out.get("error") if isinstance(out, dict) else None
    if err is None:
        return out
    status = err.get("status", 500)
    if status == 429:  # the upstream's (a provider's) rate limit, with its Retry-After passed on
        raise UpstreamRateLimited(err["message"], retry_after=err.get("retry_after"))
    if status == 502:
        raise UpstreamFailed(err["message"])
    if status == 413:
        raise PromptTooLong(err["message"], param="prompt")
    if status == 504:
        raise UpstreamTimeout(err["message"])
    if status == 400:
        raise BadRequest(err["message"], param=err.get("param"))
    if status == 503:
        raise Overloaded(err["message"], headers={"retry-after": "1"})
    raise ServeError(err["message"])


def fallback_reason(e: ServeError) -> str | None:
    """What ``e`` is among the failures ``fallbacks.on`` names (429, 5xx, timeout); None for the caller's own
    errors (4xx), which another version would refuse too."""
    if e.status == 429:
        return "429"
    if e.status == 504:
        return "timeout"
    return "5xx" if e.status >= 500 else None


class Dispatcher:
    """Deployment handles and coalescers of the live versions one replica has talked to, and where each request
    goes when its version fails (:meth:`attempts`)."""

    def __init__(self, recorder: Recorder, table: RoutingTable | None = None) -> None:
        self.recorder = recorder
        self.table = table
        self.handles: dict[str, Any] = {}
        self.coalescers: dict[tuple[str, int, int, float, float], Coalescer] = {}
        # (model, version) -> time.monotonic() before which its upstream asked not to be called (Retry-After)
        self.cooling: dict[tuple[str, str], float] = {}

    async def attempts(self, t: Ticket, route: Route, once: Callable[[Route], Awaitable[T]]) -> tuple[Route, T]:
        """``once(route)``, or — when it fails as ``fallbacks.on`` says and the model's config has a
        ``fallbacks.order`` — ``once`` of the next live version in that order, up to ``fallbacks.max_attempts``
        versions; returns the route that answered and its answer. Each failed attempt is recorded against its
        version (:meth:`Recorder.fell_back`). An upstream's 429 Retry-After is honoured: until it has passed, the
        version is not called from this replica — skipped for a fallback, or answered 429 at once with the time
        left when there is none. Raises the last attempt's error."""
        spec = route.config.fallbacks
        chain: list[Route] | None = None
        tried = {route.version}
        while True:
            wait = self.cooling.get((route.model, route.version), 0.0) - time.monotonic()
            if wait > 0:
                err: ServeError = UpstreamRateLimited(
                    f"{route.model}:{route.version}'s upstream asked for no requests for {wait:.1f}s more",
                    retry_after=wait,
                )
                reason, status = "retry-after", 0
            else:
                try:
                    return route, await once(route)
                except ServeError as e:
                    retry_after = e.retry_after if isinstance(e, UpstreamRateLimited) else None
                    if retry_after:
                        self.cooling[(route.model, route.version)] = time.monotonic() + float(retry_after)
                    reason, status, err = fallback_reason(e), e.status, e
                    if reason is None or reason not in spec.on:
                        raise
            if not spec.order or t.attempt >= spec.max_attempts or self.table is None:
                raise err
            if chain is None:
                chain = self.table.fallbacks(route)
            now = time.monotonic()
            nxt = next(
                (r for r in chain if r.version not in tried and self.cooling.get((r.model, r.version), 0.0) <= now),
                None,
            )
            if nxt is None:
                raise err
            self.recorder.fell_back(t, route, status, reason, nxt)
            tried.add(nxt.version)
            route = nxt

    def handle(self, app_name: str) -> Any:
        h = self.handles.get(app_name)
        if h is None:
            from ray import serve

            from slipway.serve.model_server import DEPLOYMENT_NAME

            h = self.handles[app_name] = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)
        return h

    async def call(self, route: Route, payload: dict[str, Any]) -> dict[str, Any]:
        """The version's answer; :class:`UpstreamTimeout` past ``request_timeout_s``, :class:`Overloaded` when
        the model server's queue is full, the model server's own errors as :class:`ServeError`."""
        from ray.serve.exceptions import BackPressureError

        cfg, timeout_s = route.config, route.config.request_timeout_s
        payload = route.payload(payload)
        if not cfg.coalesce:
            resp = self.handle(route.app).generate.remote(payload)
            fut: Any = await_ref(resp)
        else:
            fut = self.coalescer(route.app, cfg).submit(payload)
            resp = None
        try:
            out = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            if resp is not None:
                resp.cancel()
            raise UpstreamTimeout(f"no answer within {timeout_s:g}s") from None
        except BackPressureError:
            raise Overloaded("the model server's queue is full; retry shortly", headers={"retry-after": "1"}) from None
        return check_answer(out)

    def coalescer(self, app_name: str, cfg: ServingConfig) -> Coalescer:
        """One coalescer per live version: concurrent requests to it leave as one ``generate_many`` call."""
        replicas = cfg.num_replicas or (cfg.autoscaling.min_replicas if cfg.autoscaling else 1)
        # A static batcher takes one crowd at a time: hold the next crowd here until a replica is free. A
        # continuous engine takes requests at every step: send whatever is waiting at once, many calls in flight.
        inflight = (
            replicas if cfg.backend == "hf" and cfg.engine.batching == "static" else replicas * cfg.max_batch_size
        )
        key = (app_name, inflight, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.coalesce_max_wait_s)
        c = self.coalescers.get(key)
        if c is None:
            handle = self.handle(app_name)
            c = self.coalescers[key] = Coalescer(
                lambda items: await_ref(handle.generate_many.remote(items)),
                max_inflight=max(1, inflight),
                max_items=max(cfg.max_batch_size, 1) * 2,
                min_linger_s=min(cfg.batch_wait_timeout_s, 0.005),
                max_linger_s=cfg.coalesce_max_wait_s,
            )
        return c

    async def embed(self, route: Route, payload: dict[str, Any]) -> dict[str, Any]:
        """The version's embeddings of ``payload["inputs"]`` (never coalesced: one call embeds them all)."""
        from ray.serve.exceptions import BackPressureError

        timeout_s = route.config.request_timeout_s
        resp = self.handle(route.app).embed.remote(route.payload(payload))
        try:
            out = await asyncio.wait_for(await_ref(resp), timeout_s)
        except TimeoutError:
            resp.cancel()
            raise UpstreamTimeout(f"no answer within {timeout_s:g}s") from None
        except BackPressureError:
            raise Overloaded("the model server's queue is full; retry shortly", headers={"retry-after": "1"}) from None
        return check_answer(out)

    def stream(self, route: Route, payload: dict[str, Any]) -> Any:
        """The version's streaming generator (never coalesced)."""
        return self.handle(route.app).options(stream=True).stream.remote(route.payload(payload))

    async def shadow(self, route: Route, payload: dict[str, Any]) -> Answer:
        """Send a mirrored copy to ``route``; its outcome is recorded (no usage row) and returned — status, latency
        and text — for the caller to pair with the client's answer; the client never sees it."""
        t = Ticket(rid="", t0=time.perf_counter(), model=route.model, principal=SHADOW, shadow=True)
        self.recorder.admitted(t, route, {}, None)
        status = 200
        try:
            async with self.recorder.scope(t):
                t.answered(await self.call(route, payload))
        except Exception as e:
            status = status_for(e)
        out = t.out or {}
        text = "\n\n".join(c["text"] for c in out["choices"]) if out.get("choices") else out.get("text", "")
        return Answer(route.version, status, (time.perf_counter() - t.t0) * 1000.0, text if status == 200 else "")

"""The OpenAI-compatible gateway: the Ray Serve ingress deployment, its HTTP routes and their wiring.

One gateway application serves every model (one base URL for clients, like LiteLLM). Each replica keeps
the routing table in memory and long-polls the weight store (:mod:`slipway.serve.store`) for changes, so a
weight change reaches every replica in milliseconds and nothing is redeployed. Live versions are separate
Serve applications reached through deployment handles. The work is done by one module per concept:
:mod:`~slipway.serve.admission` (limits, version, budget hold), :mod:`~slipway.serve.dispatch` (routing table,
calls, coalescing, shadows), :mod:`~slipway.serve.streaming` (SSE) and :mod:`~slipway.serve.recording` (every
request's outcome, recorded in one place).
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress wrapper.

import asyncio
import contextlib
import logging
import os
import random
import time
import uuid
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from slipway.serve import protocol as p
from slipway.serve import streaming
from slipway.serve.admission import Admission, Admitter, Budgets, budget_guard, choices_of
from slipway.serve.auth import Authenticator, JwtConfig
from slipway.serve.dispatch import Dispatcher, RoutingTable, await_ref
from slipway.serve.errors import BadRequest, ServeError
from slipway.serve.oidc import OidcConfig
from slipway.serve.pairs import Answer, PairBuffer, make_pair
from slipway.serve.ratelimit import make_limiter
from slipway.serve.recording import Breaker, InFlight, Instruments, Recorder, Ticket
from slipway.serve.usage_writer import UsageWriter
from slipway.serve.windows import LATENCY_BOUNDS_MS

log = logging.getLogger(__name__)
GATEWAY_APP = "slipway-gateway"
BUDGET_GAUGE_S = 5.0  # how often a replica publishes its budgets' used share (read from the shared ledger)
GATEWAY_DEPLOYMENT = "Gateway"


class GatewaySettings(BaseModel):
    """How a gateway replica reaches its dependencies. Passed as the deployment's init argument."""

    database_url: str | None = Field(default=None, description="Registry for API keys and usage records.")
    redis_url: str | None = Field(default=None, description="Redis for shared rate limits and the response cache.")
    jwt_algorithm: str = Field(default="HS256", description="HS256 or RS256.")
    jwt_secret: str | None = Field(default=None, description="HS256 shared secret; JWTs refused when unset.")
    jwt_public_key: str | None = Field(default=None, description="RS256 PEM public key.")
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    oidc: dict[str, Any] | None = Field(
        default=None,
        description="SSO: an OpenID Connect issuer whose JWTs are accepted (OidcConfig fields: issuer, audience, "
        "algorithms, models_claim, team_claim, tier_claim, tiers, ...); keys from its discovery document and JWKS, "
        "rotated by kid. A token granting no model gets 403. Default none.",
    )
    key_cache_ttl_s: float = Field(default=5.0, ge=0.0, description="How long a key lookup is trusted.")
    key_stale_if_error_s: float = Field(
        default=900.0,
        ge=0.0,
        description="While the registry is unreachable, a key looked up before keeps its last answer this much "
        "longer (a key revoked meanwhile works until then; never past its expiry); unknown keys get 503 "
        "registry_unavailable. Default 900 s (15 min); 0 refuses every key whose cache entry expired.",
    )
    usage_interval_s: float = Field(default=0.5, gt=0.0, description="Usage records are written this often.")
    usage_stream: bool = Field(
        default=True,
        description="With redis_url: each usage row is appended to a Redis stream before the answer and written "
        "to the registry by every replica's consumer, so a replica that dies loses none. False (or no Redis): "
        "rows are buffered in the replica's memory and lost if it dies. Default true.",
    )
    metrics_push_s: float = Field(default=0.25, gt=0.0, description="Metric buckets are pushed this often.")
    sticky_by_key: bool = Field(default=True, description="Without a `user` field, route sticky by API key.")
    budget: dict[str, Any] | None = Field(
        default=None,
        description="A CostBudget document (as a mapping). Each request reserves its worst-case cost on the budgets of "
        "its key, team and model before it runs and settles the real cost after; at a hard limit the key gets 429 "
        "insufficient_quota. Counters live in Redis when redis_url is set (shared by every replica). Default none.",
    )
    prompt_log: dict[str, Any] | None = Field(
        default=None,
        description="Opt-in prompt/response logging (PromptLogSettings fields: models, encryption, transit_key, "
        "kms_key_id, batch_size): exchanges with the listed models are PII-redacted, encrypted (Vault transit or a "
        "KMS data key; access from the replica's environment) and stored in the artifact store. Default off.",
    )
    prompt_log_flush_s: float = Field(default=30.0, gt=0.0, description="Partial batches are stored this often.")
    routes: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Versions to put in the weight store when it knows none of a model (config-file deploys): "
        "[{model, version, app, weight, config, adapter?}] (adapter: {name, uri, sha256, base} of a LoRA version "
        "served on its base's application).",
    )


def _error_response(e: ServeError) -> JSONResponse:
    # Serve's proxy sets x-request-id on every response (the caller's own id when it sent one).
    return JSONResponse(
        e.body(), status_code=e.status, headers={k: v for k, v in e.headers.items() if k != "x-request-id"}
    )


def _request_id(request: Request) -> str:
    """Serve's id of this request: the caller's ``x-request-id`` when given, else one the proxy generated."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or request.headers.get("x-request-id") or uuid.uuid4().hex


def _prompt_of(payload: dict[str, Any]) -> Any:
    """What the prompt log keeps of a request: its prompt, its prompts or its messages."""
    return payload.get("prompt") or payload.get("prompts") or payload.get("messages")


def _texts(out: dict[str, Any]) -> str:
    """An answer's text for the prompt log: its one text, or each choice's, one after the other."""
    choices = out.get("choices")
    return out["text"] if not choices else "\n\n".join(c["text"] for c in choices)


def _json_answer(rid: str, model: str, out: dict[str, Any], headers: dict[str, str], chat: bool) -> JSONResponse:
    body = p.chat_body(f"chatcmpl-{rid}", model, out) if chat else p.completion_body(f"cmpl-{rid}", model, out)
    return JSONResponse(body, headers=headers)


app = FastAPI(
    title="slipway gateway",
    version="1",
    description="OpenAI-compatible completions and chat completions over the live versions of slipway models.",
)


@app.exception_handler(ServeError)
async def _serve_error(request: Request, e: ServeError) -> JSONResponse:
    return _error_response(e)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """An unknown path or method, in OpenAI's error shape (404 or 405)."""
    what = "path" if e.status_code == 404 else "method"
    err = BadRequest(
        f"{request.method} {request.url.path}: unknown {what}; this gateway serves POST /v1/completions, "
        "POST /v1/chat/completions, POST /v1/embeddings and GET /v1/models",
        code="not_found" if e.status_code == 404 else "method_not_allowed",
    )
    err.status = e.status_code
    return _error_response(err)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    err = BadRequest(f"{param or 'body'}: {first.get('msg')}", param=param, code="invalid_request")
    err.status = 422
    return _error_response(err)


# Helpers sit above the deployment class: Serve pickles the ingress class by value when it is decorated.


def _secret(value: str | None) -> str | None:
    """``value``, or what its ``vault://`` reference (whole or ``${...}`` inside) resolves to."""
    from slipway import secrets

    return secrets.resolve(value) if value else value


def _prompt_logger(doc: dict[str, Any] | None) -> Any:
    from slipway.serve.promptlog import PromptLogger, PromptLogSettings

    if not doc or not doc.get("models"):
        return None
    return PromptLogger.from_settings(PromptLogSettings.model_validate(doc))


def _usage_writer(st: GatewaySettings, replica: str) -> Any:
    """The usage rows' path: a Redis stream when there is Redis (durable), else this replica's memory."""
    if st.database_url and st.redis_url and st.usage_stream:
        from slipway.serve.usage_stream import StreamUsageWriter

        return StreamUsageWriter(st.database_url, st.redis_url, consumer=replica, interval_s=st.usage_interval_s)
    return UsageWriter(st.database_url, interval_s=st.usage_interval_s)


def _instruments() -> Instruments:
    """The gateway's metrics, exported to Prometheus by Ray (the dashboard's queries name these)."""
    from ray.serve import metrics

    tags = ("model", "version")
    bounds = [float(b) for b in LATENCY_BOUNDS_MS]
    return Instruments(
        requests=metrics.Counter("slipway_requests", "Answered requests.", tag_keys=(*tags, "status")),
        errors=metrics.Counter("slipway_errors", "Requests answered with 5xx.", tag_keys=tags),
        tokens=metrics.Counter("slipway_tokens", "Tokens processed.", tag_keys=(*tags, "kind")),
        latency=metrics.Histogram("slipway_latency_ms", "End-to-end latency.", bounds, tag_keys=tags),
        ttft=metrics.Histogram("slipway_ttft_ms", "Time to first token.", bounds, tag_keys=tags),
        batch=metrics.Histogram(
            "slipway_batch_size", "Batch a request ran in.", [1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=tags
        ),
        weight=metrics.Gauge(
            "slipway_traffic_weight", "Share of new requests routed to a version (0-1).", tag_keys=tags
        ),
        shadow=metrics.Gauge("slipway_shadow_share", "Share of requests mirrored to a version.", tag_keys=tags),
        spend=metrics.Counter("slipway_spend_usd", "US dollars settled against budgets (token prices).", tag_keys=tags),
        breaker_trips=metrics.Counter(
            "slipway_breaker_trips", "Times the gateway's breaker zeroed a version's weight.", tag_keys=tags
        ),
        budget_used=metrics.Gauge(
            "slipway_budget_used_ratio",
            "Share of a budget's hard limit (soft when it has none) spent in its current window.",
            tag_keys=("budget",),
        ),
        fallbacks=metrics.Counter(
            "slipway_fallbacks",
            "Requests sent on to another version after theirs failed (ServingConfig fallbacks); version: the one "
            "that failed, reason: 429 | 5xx | timeout | retry-after.",
            tag_keys=(*tags, "reason"),
        ),
    )


@serve.deployment(name=GATEWAY_DEPLOYMENT, max_ongoing_requests=2000, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Gateway:
    """Routes and wiring: admission (:mod:`~slipway.serve.admission`), dispatch (:mod:`~slipway.serve.dispatch`),
    recording (:mod:`~slipway.serve.recording`) and streaming (:mod:`~slipway.serve.streaming`) do the work."""

    async def __init__(self, settings: dict[str, Any] | None = None) -> None:
        from slipway.serve.cache import ResponseCache
        from slipway.serve.store import get_store

        self.settings = st = GatewaySettings.model_validate(settings or {})
        # Secrets stay out of generated config files: the replica's environment supplies them, as values or as
        # vault:// references resolved here (never logged).
        st.database_url = _secret(st.database_url or os.environ.get("SLIPWAY_DATABASE_URL"))
        st.redis_url = _secret(st.redis_url or os.environ.get("SLIPWAY_REDIS_URL"))
        st.jwt_secret = _secret(st.jwt_secret or os.environ.get("SLIPWAY_JWT_SECRET"))
        st.jwt_public_key = _secret(st.jwt_public_key or os.environ.get("SLIPWAY_JWT_PUBLIC_KEY"))
        jwt = None
        if st.jwt_secret or st.jwt_public_key:
            jwt = JwtConfig(st.jwt_algorithm, st.jwt_secret, st.jwt_public_key, st.jwt_audience, st.jwt_issuer)
        self.auth = Authenticator(
            st.database_url,
            jwt=jwt,
            oidc=OidcConfig.model_validate(st.oidc) if st.oidc else None,
            cache_ttl_s=st.key_cache_ttl_s,
            stale_if_error_s=st.key_stale_if_error_s,
        )
        self.cache = ResponseCache(st.redis_url) if st.redis_url else None
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.usage = _usage_writer(st, self.replica)
        self.promptlog = _prompt_logger(st.prompt_log)
        self.usage.start()
        self.store = get_store()
        self.rng = random.Random()
        self._bg: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.table = RoutingTable()
        self.inflight = InFlight()
        m = _instruments()
        self.m = m
        self.budgets = budgets = Budgets(budget_guard(st.budget, st.redis_url), spend=m.spend, prices=self.table.price)
        self.recorder = Recorder(
            instruments=m,
            usage=self.usage,
            breaker=Breaker(self.table, self._trip),
            inflight=self.inflight,
            settle=budgets.close,
            spawn=self._spawn,
        )
        self.admitter = Admitter(
            table=self.table,
            limiter=make_limiter(st.redis_url),
            budgets=budgets,
            inflight=self.inflight,
            sticky_by_key=st.sticky_by_key,
            rng=self.rng,
        )
        self.dispatch = Dispatcher(self.recorder, self.table)
        self.pairs = PairBuffer()  # mirrored requests' answer pairs, pushed to the store for canary analysis
        # Block until the routing table is known, so a fresh replica never answers 404 for a live model.
        rev, table = await self.store.snapshot.remote()
        if self.settings.routes:
            rev, table = await self._seed(table)
        self._apply(rev, table)
        loop = asyncio.get_running_loop()
        self._bg = [loop.create_task(self._follow_weights()), loop.create_task(self._push_metrics())]
        if self.promptlog is not None:
            self._bg.append(loop.create_task(self._flush_prompt_logs()))

    async def _seed(self, table: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Routes of a config-file deploy go into the store unless it already knows the model (the control
        plane's later weight changes win over the file)."""
        fresh: dict[str, dict[str, float]] = {}
        for r in sorted(self.settings.routes, key=lambda r: "adapter" in r):  # a base before its adapters
            if r["model"] in table:
                continue
            await self.store.put_version.remote(
                r["model"], int(r["version"]), r["app"], r["config"], r.get("adapter"), r.get("kind"), r.get("price")
            )
            fresh.setdefault(r["model"], {})[str(r["version"])] = float(r["weight"])
        for model, weights in fresh.items():
            await self.store.set_weights.remote(model, weights, {})
        return await self.store.snapshot.remote()

    # --- background ------------------------------------------------------------------------------------

    async def _follow_weights(self) -> None:
        while True:
            try:
                rev, table = await self.store.wait.remote(self.table.rev, 30.0)
                if rev < self.table.rev and not table and self.table.table:
                    # The store was restarted empty: give it back the table this replica still routes by.
                    log.warning("weight store restarted empty (revision %d < %d): restoring it", rev, self.table.rev)
                    await self.store.restore.remote(self.table.rev, self.table.table)
                    continue
                if rev != self.table.rev:
                    self._apply(rev, table)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("weight store unreachable; retrying")
                await asyncio.sleep(1.0)

    def _apply(self, rev: int, table: dict[str, Any]) -> None:
        """Take a new routing table, and export each version's weight and shadow share."""
        self.table.apply(rev, table)
        self.recorder.export_weights(table)

    def _trip(self, model: str, version: str, reason: str) -> None:
        self.m.breaker_trips.inc(tags={"model": model, "version": version})
        self._spawn(await_ref(self.store.trip.remote(model, version, reason)))

    async def _push_metrics(self) -> None:
        budgets_at = 0.0
        while True:
            await asyncio.sleep(self.settings.metrics_push_s)
            try:
                await self._push_once()
                if time.monotonic() - budgets_at >= BUDGET_GAUGE_S:
                    budgets_at = time.monotonic()
                    await self.budgets.publish(self.m.budget_used)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pushing metrics failed")

    async def _push_once(self) -> None:
        await self.store.push.remote(
            self.replica, self.recorder.drain(), self.inflight.snapshot(), self.inflight.oldest()
        )
        pairs = self.pairs.drain()
        if pairs:
            await self.store.push_pairs.remote(pairs)

    async def _pair(self, t: Ticket, answered: Answer, shadow: Any, payload: dict[str, Any]) -> None:
        """Mirror the request to ``shadow`` and keep both answers as a pair for canary analysis; a model that
        opted in to prompt logging gets the shadow's answer logged too (under ``<request id>:shadow``)."""
        other = await self.dispatch.shadow(shadow, payload)
        self.pairs.add(make_pair(t.model, t.rid, payload, answered, other))
        if self.promptlog is not None and self.promptlog.enabled(t.model) and t.principal is not None:
            await asyncio.to_thread(
                self.promptlog.log,
                model=t.model,
                version=int(other.version),
                request_id=f"{t.rid}:shadow",
                prompt=_prompt_of(payload),
                response=other.text,
                key=t.principal.key_name or t.principal.subject,
            )

    async def _flush_prompt_logs(self) -> None:
        while True:
            await asyncio.sleep(self.settings.prompt_log_flush_s)
            try:
                await asyncio.to_thread(self.promptlog.flush)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("storing prompt logs failed; they stay buffered")

    def _log_exchange(self, t: Ticket, prompt: Any, text: str) -> None:
        """Hand an answered exchange of an opted-in model to the prompt logger, off the event loop."""
        if self.promptlog is None or not self.promptlog.enabled(t.model) or t.principal is None:
            return
        self._spawn(
            asyncio.to_thread(
                self.promptlog.log,
                model=t.model,
                version=int(t.version),
                request_id=t.rid,
                prompt=prompt,
                response=text,
                key=t.principal.key_name or t.principal.subject,
            )
        )

    async def __del__(self) -> None:
        for t in self._bg:
            t.cancel()
        if self.promptlog is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.promptlog.flush)
        await self.usage.close()
        with contextlib.suppress(Exception):
            await self._push_once()

    def _spawn(self, coro: Any) -> None:
        """Run ``coro`` after the answer; keep a reference so the task is not garbage-collected mid-flight."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- a request -------------------------------------------------------------------------------------

    async def _complete(
        self, request: Request, body: p._GenParams, authorization: str | None, prompt: dict[str, Any], chat: bool
    ) -> Any:
        """Authenticate, admit, answer: every outcome from here on is recorded by the recorder's scope."""
        t = Ticket(rid=_request_id(request), t0=time.perf_counter(), model=self.table.label(body.model))
        async with self.recorder.scope(t):
            t.principal = await self.auth.authenticate(authorization)
            adm = await self.admitter.admit(t.principal, body, prompt)
            self.recorder.admitted(t, adm.route, adm.headers, adm.hold)
            if body.stream:
                return await self._stream(t, adm, body, chat)
            return await self._answer(t, adm, body, chat)

    async def _answer(self, t: Ticket, adm: Admission, body: p._GenParams, chat: bool) -> JSONResponse:
        route, payload = adm.route, adm.payload
        cache_key = None
        if self.cache is not None and route.config.cache.enabled and body.temperature == 0:
            cache_key = self.cache.key(route.model, route.version, payload)
            hit = await self.cache.get(cache_key)
            if hit is not None:
                t.answered({**hit, "batch_size": None}, cache_hit=True)  # a cached answer costs nothing
                return _json_answer(t.rid, route.model, hit, t.headers | {"x-slipway-cache": "hit"}, chat)
        first = route
        route, out = await self.dispatch.attempts(t, route, lambda r: self.dispatch.call(r, payload))
        t.answered(out)
        self._log_exchange(t, _prompt_of(payload), _texts(out))
        answered = Answer(route.version, 200, (time.perf_counter() - t.t0) * 1000.0, _texts(out))
        for shadow in self.table.shadows(route, self.rng):
            self._spawn(self._pair(t, answered, shadow, payload))
        if cache_key is not None and route is first:  # a fallback's answer is not the chosen version's
            self._spawn(self.cache.put(cache_key, out, route.config.cache.ttl_s))
        return _json_answer(t.rid, route.model, out, t.headers, chat)

    async def _stream(self, t: Ticket, adm: Admission, body: p._GenParams, chat: bool) -> StreamingResponse:
        route, timeout_s = adm.route, adm.route.config.request_timeout_s
        deadline = t.t0 + timeout_s

        async def open_stream(r: Any) -> tuple[Any, dict[str, Any]]:
            g = self.dispatch.stream(r, adm.payload)
            return g, await streaming.first_item(g, deadline, timeout_s)

        # a version that fails before its first token falls back like a non-streamed request (fallbacks)
        route, (gen, first) = await self.dispatch.attempts(t, route, open_stream)
        t.ttft_ms = (time.perf_counter() - t.t0) * 1000.0
        s = streaming.Stream(
            gen=gen,
            first=first,
            deadline=deadline,
            prompt_bound=adm.prompt_bound,
            rid=t.rid,
            model=route.model,
            chat=chat,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            created=int(time.time()),
            choices=choices_of(adm.payload),
        )
        prompt = _prompt_of(adm.payload)
        events = streaming.sse(s, t, self.recorder, lambda text: self._log_exchange(t, prompt, text))
        t.deferred = True  # from here the stream closes the ticket
        return StreamingResponse(events, media_type="text/event-stream", headers=t.headers)

    # --- routes ----------------------------------------------------------------------------------------

    @app.get("/health", summary="Liveness of this gateway replica.")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": sorted(self.table.table), "revision": self.table.rev}

    @app.get("/v1/models", summary="Models the caller may use.")
    async def list_models(self, request: Request, authorization: str | None = Header(default=None)) -> JSONResponse:
        principal = await self.auth.authenticate(authorization)
        data = [
            {
                "id": m,
                "object": "model",
                "created": 0,
                "owned_by": "slipway",
                "versions": {v: e["weight"] for v, e in entry["versions"].items() if e["state"] == "live"},
            }
            for m, entry in sorted(self.table.table.items())
            if not principal.models or m in principal.models
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions", summary="Complete a prompt (OpenAI Completions API).")
    async def completions(
        self, request: Request, body: p.CompletionRequest, authorization: str | None = Header(default=None)
    ) -> Any:
        return await self._complete(request, body, authorization, body.prompt_payload(), chat=False)

    @app.post("/v1/chat/completions", summary="Answer a conversation (OpenAI Chat Completions API).")
    async def chat_completions(
        self, request: Request, body: p.ChatCompletionRequest, authorization: str | None = Header(default=None)
    ) -> Any:
        messages = [{"role": m.role, "content": m.content or ""} for m in body.messages]
        return await self._complete(request, body, authorization, {"messages": messages}, chat=True)

    @app.post("/v1/embeddings", summary="Embed texts (OpenAI Embeddings API).")
    async def embeddings(
        self, request: Request, body: p.EmbeddingRequest, authorization: str | None = Header(default=None)
    ) -> JSONResponse:
        t = Ticket(rid=_request_id(request), t0=time.perf_counter(), model=self.table.label(body.model))
        async with self.recorder.scope(t):
            t.principal = await self.auth.authenticate(authorization)
            adm = await self.admitter.admit_embeddings(t.principal, body)
            self.recorder.admitted(t, adm.route, adm.headers, adm.hold)
            out = await self.dispatch.embed(adm.route, adm.payload)
            t.answered(out)
            return JSONResponse(p.embeddings_body(adm.route.model, out, body.encoding_format), headers=t.headers)


def build(args: dict[str, Any]) -> Any:
    """Application builder for ``serve deploy``/KubeRay: ``import_path: slipway.serve.gateway:build``."""
    return Gateway.bind(args.get("settings", {}))

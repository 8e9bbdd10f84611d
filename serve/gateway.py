"""The OpenAI-compatible gateway: authenticate, rate-limit, pick a version by weight, call it, record usage.

One gateway application serves every model (one base URL for clients, like LiteLLM). Each replica keeps
the routing table in memory and long-polls the weight store (:mod:`slipway.serve.store`) for changes, so a
weight change reaches every replica in milliseconds and nothing is redeployed. Live versions are separate
Serve applications reached through deployment handles.
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress wrapper.

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve

from slipway.policies.servingconfig import ServingConfig
from slipway.serve import protocol as p
from slipway.serve.auth import Authenticator, JwtConfig, Principal
from slipway.serve.budget import BudgetGuard, Reservation
from slipway.serve.coalesce import Coalescer
from slipway.serve.errors import (
    BadRequest,
    ModelNotFound,
    Overloaded,
    PromptTooLong,
    ServeError,
    UpstreamTimeout,
)
from slipway.serve.model_server import DEPLOYMENT_NAME
from slipway.serve.ratelimit import Decision, make_limiter
from slipway.serve.routing import choose, shadow_targets
from slipway.serve.usage_writer import UsageWriter
from slipway.serve.windows import LATENCY_BOUNDS_MS, Bucket

log = logging.getLogger(__name__)
GATEWAY_APP = "slipway-gateway"
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
    key_cache_ttl_s: float = Field(default=5.0, ge=0.0, description="How long a key lookup is trusted.")
    usage_interval_s: float = Field(default=0.5, gt=0.0, description="Usage records are written this often.")
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
        "[{model, version, app, weight, config}].",
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


app = FastAPI(
    title="slipway gateway",
    version="1",
    description="OpenAI-compatible completions and chat completions over the live versions of slipway models.",
)


@app.exception_handler(ServeError)
async def _serve_error(request: Request, e: ServeError) -> JSONResponse:
    return _error_response(e)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    err = BadRequest(f"{param or 'body'}: {first.get('msg')}", param=param, code="invalid_request")
    err.status = 422
    return _error_response(err)


class _Models:
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


# Helpers sit above the deployment class: Serve pickles the ingress class by value when it is decorated.
_SHADOW = Principal(subject="shadow")


async def _await(resp: Any) -> Any:
    return await resp


def _check(out: dict[str, Any]) -> dict[str, Any]:
    err = out.get("error") if isinstance(out, dict) else None
    if err is None:
        return out
    status = err.get("status", 500)
    if status == 413:
        raise PromptTooLong(err["message"], param="prompt")
    if status == 504:
        raise UpstreamTimeout(err["message"])
    raise ServeError(err["message"])


def payload_text(payload: dict[str, Any]) -> str:
    """A request's prompt, or its messages as JSON: what budgets estimate from."""
    return payload.get("prompt") or json.dumps(payload.get("messages"))


def _secret(value: str | None) -> str | None:
    """``value``, or what its ``vault://`` reference (whole or ``${...}`` inside) resolves to."""
    from slipway import secrets

    return secrets.resolve(value) if value else value


def _prompt_logger(doc: dict[str, Any] | None) -> Any:
    from slipway.serve.promptlog import PromptLogger, PromptLogSettings

    if not doc or not doc.get("models"):
        return None
    return PromptLogger.from_settings(PromptLogSettings.model_validate(doc))


def _budget_guard(doc: dict[str, Any] | None, redis_url: str | None) -> BudgetGuard | None:
    from slipway.policies.costbudget import CostBudget
    from slipway.serve.budget import LocalLedger, RedisLedger

    if not doc:
        return None
    return BudgetGuard(CostBudget.model_validate(doc), ledger=RedisLedger(redis_url) if redis_url else LocalLedger())


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)


@serve.deployment(name=GATEWAY_DEPLOYMENT, max_ongoing_requests=2000, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Gateway:
    async def __init__(self, settings: dict[str, Any] | None = None) -> None:
        from ray.serve import metrics

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
        self.auth = Authenticator(st.database_url, jwt=jwt, cache_ttl_s=st.key_cache_ttl_s)
        self.limiter = make_limiter(st.redis_url)
        self.cache = ResponseCache(st.redis_url) if st.redis_url else None
        self.usage = UsageWriter(st.database_url, interval_s=st.usage_interval_s)
        self.budget = _budget_guard(st.budget, st.redis_url)
        self.promptlog = _prompt_logger(st.prompt_log)
        self.usage.start()
        self.models = _Models()
        self.store = get_store()
        self.rng = random.Random()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.handles: dict[str, Any] = {}
        self.coalescers: dict[tuple[str, int, int, float, float], Coalescer] = {}
        self.inflight: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.model_inflight: dict[str, int] = defaultdict(int)
        self.pending: dict[tuple[str, str, int], Bucket] = {}
        self.consecutive_errors: dict[tuple[str, str], int] = {}
        self._bg: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        tags = ("model", "version")
        self.m_requests = metrics.Counter("slipway_requests", "Answered requests.", tag_keys=(*tags, "status"))
        self.m_errors = metrics.Counter("slipway_errors", "Requests answered with 5xx.", tag_keys=tags)
        self.m_tokens = metrics.Counter("slipway_tokens", "Tokens processed.", tag_keys=(*tags, "kind"))
        bounds = [float(b) for b in LATENCY_BOUNDS_MS]
        self.m_latency = metrics.Histogram("slipway_latency_ms", "End-to-end latency.", bounds, tag_keys=tags)
        self.m_ttft = metrics.Histogram("slipway_ttft_ms", "Time to first token.", bounds, tag_keys=tags)
        self.m_batch = metrics.Histogram(
            "slipway_batch_size", "Batch a request ran in.", [1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=tags
        )
        self.m_weight = metrics.Gauge(
            "slipway_traffic_weight", "Share of new requests routed to a version (0-1).", tag_keys=tags
        )
        self.m_shadow = metrics.Gauge("slipway_shadow_share", "Share of requests mirrored to a version.", tag_keys=tags)
        self.m_spend = metrics.Counter(
            "slipway_spend_usd", "US dollars settled against budgets (token prices).", tag_keys=tags
        )
        self._weighted: set[tuple[str, str]] = set()
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
        for r in self.settings.routes:
            if r["model"] in table:
                continue
            await self.store.put_version.remote(r["model"], int(r["version"]), r["app"], r["config"])
            fresh.setdefault(r["model"], {})[str(r["version"])] = float(r["weight"])
        for model, weights in fresh.items():
            await self.store.set_weights.remote(model, weights, {})
        return await self.store.snapshot.remote()

    # --- background ------------------------------------------------------------------------------------

    async def _follow_weights(self) -> None:
        while True:
            try:
                rev, table = await self.store.wait.remote(self.models.rev, 30.0)
                if rev < self.models.rev and not table and self.models.table:
                    # The store was restarted empty: give it back the table this replica still routes by.
                    log.warning("weight store restarted empty (revision %d < %d): restoring it", rev, self.models.rev)
                    await self.store.restore.remote(self.models.rev, self.models.table)
                    continue
                if rev != self.models.rev:
                    self._apply(rev, table)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("weight store unreachable; retrying")
                await asyncio.sleep(1.0)

    def _apply(self, rev: int, table: dict[str, Any]) -> None:
        """Take a new routing table, and export each version's weight and shadow share (0 once it is gone)."""
        self.models.apply(rev, table)
        seen = set()
        for model, entry in table.items():
            for v, e in entry.get("versions", {}).items():
                live = e.get("state") == "live"
                tags = {"model": model, "version": v}
                self.m_weight.set(float(e.get("weight", 0.0)) if live else 0.0, tags=tags)
                self.m_shadow.set(float(e.get("shadow", 0.0)) if live else 0.0, tags=tags)
                seen.add((model, v))
        for model, v in self._weighted - seen:
            self.m_weight.set(0.0, tags={"model": model, "version": v})
            self.m_shadow.set(0.0, tags={"model": model, "version": v})
        self._weighted = seen

    async def _push_metrics(self) -> None:
        while True:
            await asyncio.sleep(self.settings.metrics_push_s)
            try:
                await self._push_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pushing metrics failed")

    async def _push_once(self) -> None:
        pending, self.pending = self.pending, {}
        rows = [(m, v, s, b.to_dict()) for (m, v, s), b in pending.items()]
        inflight = {m: dict(vs) for m, vs in self.inflight.items()}
        await self.store.push.remote(self.replica, rows, inflight)

    async def _flush_prompt_logs(self) -> None:
        while True:
            await asyncio.sleep(self.settings.prompt_log_flush_s)
            try:
                await asyncio.to_thread(self.promptlog.flush)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("storing prompt logs failed; they stay buffered")

    def _log_exchange(self, rid: str, principal: Principal, model: str, version: str, prompt: Any, text: str) -> None:
        """Hand an answered exchange of an opted-in model to the prompt logger, off the event loop."""
        if self.promptlog is None or not self.promptlog.enabled(model):
            return
        self._spawn(
            asyncio.to_thread(
                self.promptlog.log,
                model=model,
                version=int(version),
                request_id=rid,
                prompt=prompt,
                response=text,
                key=principal.key_name or principal.subject,
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

    # --- helpers ---------------------------------------------------------------------------------------

    def _handle(self, app_name: str) -> Any:
        h = self.handles.get(app_name)
        if h is None:
            h = self.handles[app_name] = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)
        return h

    def _record(
        self,
        *,
        rid: str,
        principal: Principal,
        model: str,
        version: str | None,
        status: int,
        t0: float,
        ttft_ms: float | None = None,
        out: dict[str, Any] | None = None,
        cache_hit: bool = False,
        shadow: bool = False,
    ) -> None:
        latency_ms = (time.perf_counter() - t0) * 1000.0
        out = out or {}
        pt, ct, bs = out.get("prompt_tokens", 0), out.get("completion_tokens", 0), out.get("batch_size")
        v = version or "none"
        key = (model, v, int(time.time()))
        b = self.pending.get(key)
        if b is None:
            b = self.pending[key] = Bucket()
        b.record(
            status=status,
            latency_ms=latency_ms,
            ttft_ms=ttft_ms,
            prompt_tokens=pt,
            completion_tokens=ct,
            batch_size=bs,
            cache_hit=cache_hit,
            shadow=shadow,
        )
        if version:  # mirrored requests count too: a canary broken from its first request trips during mirroring
            self._breaker(model, version, status)
        tags = {"model": model, "version": v}
        self.m_requests.inc(tags={**tags, "status": str(status)})
        self.m_latency.observe(latency_ms, tags=tags)
        if status >= 500:
            self.m_errors.inc(tags=tags)
        if ttft_ms is not None:
            self.m_ttft.observe(ttft_ms, tags=tags)
        if pt:
            self.m_tokens.inc(pt, tags={**tags, "kind": "prompt"})
        if ct:
            self.m_tokens.inc(ct, tags={**tags, "kind": "completion"})
        if bs:
            self.m_batch.observe(bs, tags=tags)
        if shadow:
            return
        self.usage.add(
            {
                "ts": _now(),
                "request_id": rid,
                "api_key_id": principal.key_id,
                "model": model,
                "version": int(version) if version else None,
                "prompt_tokens": pt,
                "completion_tokens": ct,
                "latency_ms": latency_ms,
                "ttft_ms": ttft_ms,
                "status": status,
                "batch_size": bs,
                "cache_hit": cache_hit,
            }
        )

    def _breaker(self, model: str, version: str, status: int) -> None:
        """N consecutive 5xx from an armed version zero its weight — here at once, everywhere via the store."""
        entry = self.models.table.get(model, {}).get("versions", {}).get(version)
        limit = entry.get("breaker") if entry else None
        if not limit or entry.get("tripped"):
            return
        key = (model, version)
        run = self.consecutive_errors.get(key, 0) + 1 if status >= 500 else 0
        self.consecutive_errors[key] = run
        if run >= limit:
            reason = f"breaker: {run} consecutive errors"
            entry["weight"], entry["shadow"], entry["tripped"] = 0.0, 0.0, {"reason": reason}
            self.consecutive_errors[key] = 0
            self._spawn(self.store.trip.remote(model, version, reason))

    async def _admit(self, rid: str, t0: float, body: p._GenParams, authorization: str | None, text: str):
        """Authenticate, resolve the model, check limits and budgets; returns what the call needs. A refusal
        after authentication is recorded as a usage row with its status (a 429 is billable evidence too)."""
        principal = await self.auth.authenticate(authorization)
        try:
            return await self._admit_principal(principal, body, text)
        except ServeError as e:
            # A name the routing table does not know is recorded as "(unknown)": free-form client input must not
            # become a metric label (unbounded series) or a usage row PostgreSQL may refuse (lone surrogates).
            model = body.model if body.model in self.models.table else "(unknown)"
            self._record(rid=rid, principal=principal, model=model, version=None, status=e.status, t0=t0)
            raise

    async def _admit_principal(self, principal: Principal, body: p._GenParams, text: str):
        entry = self.models.table.get(body.model)
        if entry is None:
            raise ModelNotFound(f"model {body.model!r} does not exist or has no live version", param="model")
        principal.check_model(body.model)
        cfg = self.models.configs[body.model]
        max_tokens = body.max_tokens or cfg.default_max_tokens
        if max_tokens > cfg.max_new_tokens:
            raise BadRequest(
                f"max_tokens {max_tokens} exceeds this model's limit of {cfg.max_new_tokens}", param="max_tokens"
            )
        if body.stream and not cfg.streaming:
            raise BadRequest(f"streaming is disabled for model {body.model!r}", param="stream")
        rpm = principal.rpm or cfg.rate_limits.rpm
        tpm = principal.tpm or cfg.rate_limits.tpm
        decision: Decision | None = None
        if rpm or tpm:
            decision = await self.limiter.check(principal.subject, rpm=rpm, tpm=tpm, tokens=len(text) // 4 + max_tokens)
            decision.raise_if_denied(rpm, tpm)
        if cfg.max_queued_requests >= 0 and self.model_inflight[body.model] >= cfg.max_queued_requests:
            raise Overloaded(f"model {body.model!r} is overloaded; retry shortly", headers={"retry-after": "1"})
        sticky = body.user or (principal.subject if self.settings.sticky_by_key else None)
        version = choose(entry["versions"], sticky, self.rng)
        if version is None:
            raise Overloaded(f"model {body.model!r} has no version taking traffic", headers={"retry-after": "1"})
        headers = {"x-slipway-version": version}
        if decision is not None:
            headers |= decision.headers(rpm, tpm)
        payload: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "stop": body.stops(),
            "seed": body.seed,
            "deadline": time.time() + cfg.request_timeout_s,
        }
        hold = await self._reserve(principal, body.model, text, max_tokens)
        return principal, entry, cfg, version, payload, headers, hold

    # --- budgets ---------------------------------------------------------------------------------------

    async def _reserve(self, principal: Principal, model: str, text: str, max_tokens: int) -> Reservation | None:
        """Hold the request's worst-case cost on its key's, team's and model's budgets (429 when one is full).
        A token is at least one byte, so the prompt's byte count bounds its token count: the hold is never short
        for a completion prompt (chat templates may add a few tokens)."""
        if self.budget is None:
            return None
        estimate = self.budget.estimate(model, len(text.encode()), max_tokens)
        who = principal.key_name or principal.subject
        return await self.budget.areserve(who, estimate, team=principal.team, model=model)

    async def _settle(
        self, hold: Reservation | None, model: str, version: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        if hold is None or hold.done or self.budget is None:
            return
        cost = self.budget.estimate(model, prompt_tokens, completion_tokens)
        if cost > 0:  # Ray counters refuse increments of 0
            self.m_spend.inc(cost, tags={"model": model, "version": version})
        try:
            await self.budget.asettle(hold, cost)
        except Exception:  # the answer is already on its way; an unsettled hold expires on its own
            log.exception("settling budget reservation %s failed", hold.id)

    async def _release(self, hold: Reservation | None) -> None:
        if hold is None or hold.done or self.budget is None:
            return
        try:
            await self.budget.arelease(hold)
        except Exception:
            log.exception("releasing budget reservation %s failed", hold.id)

    async def _complete(
        self, request: Request, body: p._GenParams, authorization: str | None, payload_in: dict[str, Any], chat: bool
    ) -> Any:
        t0 = time.perf_counter()
        rid = _request_id(request)
        text = payload_text(payload_in)
        principal, entry, cfg, version, payload, headers, hold = await self._admit(rid, t0, body, authorization, text)
        payload |= payload_in
        model = body.model
        if body.stream:
            return await self._stream(rid, t0, principal, entry, cfg, version, payload, headers, body, chat, hold)
        cache_key = None
        if self.cache is not None and cfg.cache.enabled and body.temperature == 0:
            cache_key = self.cache.key(model, version, payload)
            hit = await self.cache.get(cache_key)
            if hit is not None:
                self._record(
                    rid=rid,
                    principal=principal,
                    model=model,
                    version=version,
                    status=200,
                    t0=t0,
                    out={**hit, "batch_size": None},
                    cache_hit=True,
                )
                await self._release(hold)  # a cached answer costs nothing
                return self._answer(rid, model, hit, headers | {"x-slipway-cache": "hit"}, chat)
        self.model_inflight[model] += 1
        self.inflight[model][version] += 1
        try:
            out = await self._call(entry, version, payload, cfg)
        except BaseException as e:
            await self._release(hold)
            if isinstance(e, ServeError):
                self._record(rid=rid, principal=principal, model=model, version=version, status=e.status, t0=t0)
                e.headers.update(headers)
            raise
        finally:
            self.model_inflight[model] -= 1
            self.inflight[model][version] -= 1
        await self._settle(hold, model, version, out.get("prompt_tokens", 0), out.get("completion_tokens", 0))
        self._record(rid=rid, principal=principal, model=model, version=version, status=200, t0=t0, out=out)
        self._log_exchange(
            rid, principal, model, version, payload_in.get("prompt") or payload_in.get("messages"), out["text"]
        )
        for v in shadow_targets(entry["versions"], version, self.rng):
            self._spawn(self._shadow(entry, model, v, payload, cfg))
        if cache_key is not None:
            self._spawn(self.cache.put(cache_key, out, cfg.cache.ttl_s))
        return self._answer(rid, model, out, headers, chat)

    @staticmethod
    def _answer(rid: str, model: str, out: dict[str, Any], headers: dict[str, str], chat: bool) -> JSONResponse:
        body = p.chat_body(f"chatcmpl-{rid}", model, out) if chat else p.completion_body(f"cmpl-{rid}", model, out)
        return JSONResponse(body, headers=headers)

    async def _call(self, entry: dict[str, Any], version: str, payload: dict[str, Any], cfg: ServingConfig):
        from ray.serve.exceptions import BackPressureError

        app_name, timeout_s = entry["versions"][version]["app"], cfg.request_timeout_s
        if not cfg.coalesce:
            resp = self._handle(app_name).generate.remote(payload)
            fut: Any = _await(resp)
        else:
            fut = self._coalescer(app_name, cfg).submit(payload)
            resp = None
        try:
            out = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            if resp is not None:
                resp.cancel()
            raise UpstreamTimeout(f"no answer within {timeout_s:g}s") from None
        except BackPressureError:
            raise Overloaded("the model server's queue is full; retry shortly", headers={"retry-after": "1"}) from None
        return _check(out)

    def _coalescer(self, app_name: str, cfg: ServingConfig) -> Coalescer:
        """One coalescer per live version: concurrent requests to it leave as one ``generate_many`` call."""
        replicas = cfg.num_replicas or (cfg.autoscaling.min_replicas if cfg.autoscaling else 1)
        key = (app_name, replicas, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.coalesce_max_wait_s)
        c = self.coalescers.get(key)
        if c is None:
            handle = self._handle(app_name)
            c = self.coalescers[key] = Coalescer(
                lambda items: _await(handle.generate_many.remote(items)),
                max_inflight=max(1, replicas),
                max_items=max(cfg.max_batch_size, 1) * 2,
                min_linger_s=min(cfg.batch_wait_timeout_s, 0.005),
                max_linger_s=cfg.coalesce_max_wait_s,
            )
        return c

    async def _shadow(
        self, entry: dict[str, Any], model: str, version: str, payload: dict[str, Any], cfg: ServingConfig
    ):
        t0 = time.perf_counter()
        status, out = 200, None
        try:
            out = await self._call(entry, version, payload, cfg)
        except ServeError as e:
            status = e.status
        except Exception:
            status = 500
        self._record(
            rid="", principal=_SHADOW, model=model, version=version, status=status, t0=t0, out=out, shadow=True
        )

    async def _stream(self, rid, t0, principal, entry, cfg, version, payload, headers, body, chat, hold) -> Any:
        model = body.model
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = self._handle(entry["versions"][version]["app"]).options(stream=True).stream.remote(payload)
        deadline = t0 + cfg.request_timeout_s
        self.model_inflight[model] += 1
        self.inflight[model][version] += 1
        try:
            first = await asyncio.wait_for(gen.__anext__(), max(0.001, deadline - time.perf_counter()))
            _check(first)
        except BaseException as e:
            self.model_inflight[model] -= 1
            self.inflight[model][version] -= 1
            gen.cancel()
            await self._release(hold)
            err = (
                e if isinstance(e, ServeError) else UpstreamTimeout(f"no first token within {cfg.request_timeout_s:g}s")
            )
            if not isinstance(e, (ServeError, TimeoutError)):
                raise
            self._record(rid=rid, principal=principal, model=model, version=version, status=err.status, t0=t0)
            err.headers.update(headers)
            raise err from None
        ttft_ms = (time.perf_counter() - t0) * 1000.0
        created = int(time.time())
        cid = f"chatcmpl-{rid}" if chat else f"cmpl-{rid}"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                data = p.chat_chunk(cid, model, delta, finish, created)
            else:
                data = p.completion_chunk(cid, model, text or "", finish, created)
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            status, final, streamed, pieces = 200, None, 0, []
            try:
                if chat:
                    yield chunk(None, None, role=True)
                item = first
                while True:
                    if "done" in item:
                        final = item
                        break
                    yield chunk(item["delta"], None)
                    streamed += 1
                    pieces.append(item["delta"])
                    item = await asyncio.wait_for(gen.__anext__(), max(0.001, deadline - time.perf_counter()))
                yield chunk(None if chat else "", final["finish_reason"])
                if include_usage:
                    u = {
                        "id": cid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": p.usage(final["prompt_tokens"], final["completion_tokens"]),
                    }
                    yield f"data: {json.dumps(u)}\n\n"
                yield "data: [DONE]\n\n"
                prompt = payload.get("prompt") or payload.get("messages")
                self._log_exchange(rid, principal, model, version, prompt, "".join(pieces))
            except (TimeoutError, StopAsyncIteration):
                status = 504
                err = UpstreamTimeout("stream ended early or timed out").body()
                yield f"data: {json.dumps(err)}\n\n"
            except asyncio.CancelledError:
                status = 499  # the client went away
                gen.cancel()
                raise
            finally:
                self.model_inflight[model] -= 1
                self.inflight[model][version] -= 1
                # A stream cut short is charged what it produced: its prompt (bounded by its hold) and the chunks sent.
                # (Spawned: this may run while the generator is being cancelled.)
                if final is not None:
                    self._spawn(self._settle(hold, model, version, final["prompt_tokens"], final["completion_tokens"]))
                elif hold is not None:
                    self._spawn(self._settle(hold, model, version, len(payload_text(payload).encode()), streamed))
                self._record(
                    rid=rid,
                    principal=principal,
                    model=model,
                    version=version,
                    status=status,
                    t0=t0,
                    ttft_ms=ttft_ms,
                    out=final,
                )

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # --- routes ----------------------------------------------------------------------------------------

    @app.get("/health", summary="Liveness of this gateway replica.")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": sorted(self.models.table), "revision": self.models.rev}

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
            for m, entry in sorted(self.models.table.items())
            if not principal.models or m in principal.models
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions", summary="Complete a prompt (OpenAI Completions API).")
    async def completions(
        self, request: Request, body: p.CompletionRequest, authorization: str | None = Header(default=None)
    ) -> Any:
        return await self._complete(request, body, authorization, {"prompt": body.prompt_text()}, chat=False)

    @app.post("/v1/chat/completions", summary="Answer a conversation (OpenAI Chat Completions API).")
    async def chat_completions(
        self, request: Request, body: p.ChatCompletionRequest, authorization: str | None = Header(default=None)
    ) -> Any:
        messages = [{"role": m.role, "content": m.content or ""} for m in body.messages]
        return await self._complete(request, body, authorization, {"messages": messages}, chat=True)


def build(args: dict[str, Any]) -> Any:
    """Application builder for ``serve deploy``/KubeRay: ``import_path: slipway.serve.gateway:build``."""
    return Gateway.bind(args.get("settings", {}))

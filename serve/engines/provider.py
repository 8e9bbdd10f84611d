"""``provider``: a hosted model behind an OpenAI-compatible API (a ``Provider`` document with ``api: openai``) as an
engine, so that a provider version is served like any version: one Serve application, the same gateway, keys,
limits, budgets, usage rows, windows, shadows and weights.

Every request is forwarded streamed (``stream_options.include_usage``), so deltas arrive as the upstream sends
them and the usage row carries the upstream's own token counts. Chat requests go to ``/chat/completions`` with
their messages as given (no local chat template), prompts to ``/completions``. The upstream's answers map to the
gateway's statuses:

- 400/404/413/422: the caller's request (400, or 413 for a context too long) with the upstream's message;
- 429: 429 with the upstream's ``Retry-After`` (seconds) carried to the client;
- 401/403: 502: the provider refused slipway's credentials, an operator's fault, never the caller's;
- 5xx, a connection failure, a stream cut before its usage: 502; no first token within ``first_token_s`` or an
  answer past ``total_s``: 504.

The key is read when the engine starts from the document's reference (``${ENV_VAR}`` or ``vault://``) and is
never logged.

:class:`BedrockEngine` is the same interface over Amazon Bedrock's Converse API (``api: bedrock``): boto3's
``converse`` for a whole answer, ``converse_stream`` for a streamed one, each in a worker thread (boto3 blocks),
mapped by :mod:`slipway.serve.providers.bedrock`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from slipway.serve.engines.base import Delta, Engine, EngineError, EngineRequest, Finish, openai_body


class UpstreamError(EngineError):
    """An upstream's refusal; ``retry_after`` (seconds) when it said when to come back."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(status, message)
        self.retry_after = retry_after


def resolve_secret(ref: str | None) -> str | None:
    """The value a ``${ENV_VAR}`` or ``vault://`` reference points to (None for None); 500 when it is not set."""
    from slipway.policies.provider import resolve_secret as resolve

    try:
        return resolve(ref)
    except LookupError as e:
        raise EngineError(500, f"{e} in the replica's environment") from None


class ProviderEngine(Engine):
    """Requests forwarded to an OpenAI-compatible upstream (``doc``: a ``Provider`` with ``api: openai``)."""

    name = "provider"

    def __init__(self, doc: Any, *, transport: Any = None) -> None:
        super().__init__()
        if doc.api != "openai":
            raise ValueError(f"provider {doc.name}: the provider engine speaks api openai, not {doc.api}")
        self.doc = doc
        self._key = resolve_secret(doc.api_key)
        self._transport = transport
        self._client: Any = None

    def encode(self, text: str) -> list[Any]:
        # The upstream's tokenizer is not here: whitespace words are a lower bound on its tokens, so slipway's own
        # prompt bound never refuses what the upstream accepts (the upstream enforces its context itself).
        return text.split()

    def _http(self) -> Any:
        import httpx

        if self._client is None:
            t = self.doc.timeouts
            headers = {}
            if self._key is not None:
                name = self.doc.auth_header
                headers[name] = f"Bearer {self._key}" if name.lower() == "authorization" else self._key
            self._client = httpx.AsyncClient(
                base_url=self.doc.base_url.rstrip("/") + "/",
                headers=headers,
                timeout=httpx.Timeout(t.first_token_s, connect=t.connect_s),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                transport=self._transport,
            )
        return self._client

    def body(self, req: EngineRequest) -> tuple[str, dict[str, Any]]:
        """The upstream path and JSON body for ``req``."""
        body = openai_body(req, self.doc.model) | dict(req.extra)
        if req.messages:
            return "chat/completions", body | {"messages": [dict(m) for m in req.messages]}
        return "completions", body | {"prompt": req.prompt}

    async def submit(self, req: EngineRequest) -> AsyncIterator[Delta | Finish]:
        self.refuse_adapter(req)
        limits = self.doc.limits
        if limits.max_tokens is not None and req.max_tokens > limits.max_tokens:
            raise EngineError(400, f"max_tokens {req.max_tokens} exceeds this provider's limit of {limits.max_tokens}")
        if limits.max_prompt_bytes is not None and len(req.prompt.encode()) > limits.max_prompt_bytes:
            raise EngineError(413, f"the prompt is more than this provider's {limits.max_prompt_bytes} bytes")
        path, body = self.body(req)
        self.counters.requests += 1
        total = self.doc.timeouts.total_s
        left = req.time_left()
        budget = total if left is None else min(total, left)
        if budget <= 0:
            self.counters.timed_out += 1
            raise EngineError(504, "the request ran past its deadline before reaching the provider")
        try:
            async with asyncio.timeout(budget):
                async for item in self._events(path, body, chat=path.startswith("chat")):
                    yield item
        except TimeoutError:
            self.counters.timed_out += 1
            raise EngineError(504, f"the provider did not finish within {budget:g}s") from None

    async def _events(self, path: str, body: dict[str, Any], *, chat: bool) -> AsyncIterator[Delta | Finish]:
        import httpx

        sent, reason = 0, None
        t0 = time.perf_counter()
        try:
            async with self._http().stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    raise self._refusal(r.status_code, (await r.aread()).decode(errors="replace"), r.headers)
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:  # an error event mid-stream
                        raise UpstreamError(502, f"the provider failed mid-stream: {_message(json.dumps(ev))}")
                    for ch in ev.get("choices") or ():
                        text = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                        if text:
                            sent += 1
                            yield Delta(text, sent)
                        reason = ch.get("finish_reason") or reason
                    usage = ev.get("usage")
                    if usage:
                        self.counters.finished += 1
                        self.counters.busy_s += time.perf_counter() - t0
                        yield Finish(reason or "stop", int(usage["prompt_tokens"]), int(usage["completion_tokens"]))
                        return
        except httpx.TimeoutException:
            self.counters.timed_out += 1
            raise EngineError(504, f"the provider sent nothing for {self.doc.timeouts.first_token_s:g}s") from None
        except httpx.HTTPError as e:
            self.counters.failed += 1
            raise UpstreamError(502, f"the provider could not be reached: {type(e).__name__}") from e
        self.counters.failed += 1
        raise UpstreamError(502, "the provider's stream ended before its usage (cut)")

    def _refusal(self, status: int, text: str, headers: Any) -> EngineError:
        self.counters.failed += 1
        message = f"the provider answered {status}: {_message(text)}"
        if status == 429:
            return UpstreamError(429, message, retry_after=_seconds(headers.get("retry-after")))
        if status in (400, 404, 422):
            return UpstreamError(400, message)
        if status == 413:
            return UpstreamError(413, message)
        return UpstreamError(502, message)  # 401/403: slipway's credentials; 5xx: the provider's fault

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def stats(self) -> dict[str, Any]:
        return super().stats() | {"provider": self.doc.name, "upstream": self.doc.base_url}


class BedrockEngine(Engine):
    """Requests sent to Amazon Bedrock's Converse API (``doc``: a ``Provider`` with ``api: bedrock``). ``client``:
    a ``bedrock-runtime`` client to use instead of one built from the document (tests pass a stubbed one)."""

    name = "bedrock"

    def __init__(self, doc: Any, *, client: Any = None) -> None:
        super().__init__()
        if doc.api != "bedrock":
            raise ValueError(f"provider {doc.name}: the bedrock engine speaks api bedrock, not {doc.api}")
        self.doc = doc
        self._client = client if client is not None else self._build_client()

    def _build_client(self) -> Any:
        import boto3
        from botocore.config import Config

        t = self.doc.timeouts
        keys = {}
        if self.doc.aws_access_key_id is not None:  # else the usual AWS chain (environment, profile, role)
            keys = {
                "aws_access_key_id": resolve_secret(self.doc.aws_access_key_id),
                "aws_secret_access_key": resolve_secret(self.doc.aws_secret_access_key),
            }
        cfg = Config(connect_timeout=t.connect_s, read_timeout=t.first_token_s, retries={"max_attempts": 1})
        return boto3.client("bedrock-runtime", region_name=self.doc.region, config=cfg, **keys)

    def encode(self, text: str) -> list[Any]:
        return text.split()  # a lower bound on Bedrock's tokens, as for the OpenAI-compatible engine

    def payload(self, req: EngineRequest) -> dict[str, Any]:
        """The model-server payload :func:`~slipway.serve.providers.bedrock.to_converse` maps."""
        out: dict[str, Any] = {
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stop": list(req.stop),
            "extra": dict(req.extra),
            "echo": req.echo,
        }
        if req.messages:
            out["messages"] = [dict(m) for m in req.messages]
        else:
            out["prompt"] = req.prompt
        return out

    async def submit(self, req: EngineRequest) -> AsyncIterator[Delta | Finish]:
        from slipway.serve.providers import bedrock

        self.refuse_adapter(req)
        limits = self.doc.limits
        if limits.max_tokens is not None and req.max_tokens > limits.max_tokens:
            raise EngineError(400, f"max_tokens {req.max_tokens} exceeds this provider's limit of {limits.max_tokens}")
        self.counters.requests += 1
        left = req.time_left()
        budget = self.doc.timeouts.total_s if left is None else min(self.doc.timeouts.total_s, left)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(budget):
                if not req.stream:
                    out = await asyncio.to_thread(bedrock.converse, self._client, self.payload(req), self.doc.model)
                    if out["text"]:
                        yield Delta(out["text"], out["completion_tokens"])
                    fin = Finish(out["finish_reason"], out["prompt_tokens"], out["completion_tokens"])
                else:
                    fin = None
                    async for item in self._stream(req):
                        if isinstance(item, Finish):
                            fin = item
                            break
                        yield item
                    assert fin is not None
        except TimeoutError:
            self.counters.timed_out += 1
            raise EngineError(504, f"Bedrock did not finish within {budget:g}s") from None
        except bedrock.ConverseError as e:
            self.counters.failed += 1
            raise UpstreamError(e.status, str(e)) from e
        self.counters.finished += 1
        self.counters.busy_s += time.perf_counter() - t0
        yield fin

    async def _stream(self, req: EngineRequest) -> AsyncIterator[Delta | Finish]:
        from botocore.exceptions import ClientError

        from slipway.serve.providers import bedrock

        def start() -> Any:
            try:
                resp = self._client.converse_stream(**bedrock.to_converse(self.payload(req), self.doc.model))
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                message = e.response.get("Error", {}).get("Message", code)
                raise bedrock.ConverseError(bedrock.status_of(code), f"Bedrock: {message}") from e
            return bedrock.stream_items(resp["stream"])

        items = await asyncio.to_thread(start)
        sent = 0
        while True:  # each event is read in a worker thread: the replica's event loop never blocks on Bedrock
            item = await asyncio.to_thread(next, items, None)
            if item is None:
                raise bedrock.ConverseError(502, "Bedrock's stream ended without its usage")
            if "delta" in item:
                sent += 1
                yield Delta(item["delta"], sent)
                continue
            yield Finish(item["finish_reason"], item["prompt_tokens"], item["completion_tokens"])
            return

    def stats(self) -> dict[str, Any]:
        return super().stats() | {"provider": self.doc.name, "region": self.doc.region}


def provider_engine(doc: Any) -> Engine:
    """The engine for a Provider document: :class:`ProviderEngine` (api openai) or :class:`BedrockEngine`."""
    return ProviderEngine(doc) if doc.api == "openai" else BedrockEngine(doc)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: not honoured (clients retry after the gateway's own Retry-After)


def _message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        return str((err.get("message") if isinstance(err, dict) else err) or text)[:300]
    except (ValueError, AttributeError):
        return text[:300]

"""Engines: what generates text inside a model server replica, one module per engine (``ServingConfig.backend``).

- ``hf`` (:mod:`.hf`): a transformers causal LM on transformers' continuous batching; with
  ``engine.batching: static``, the static batcher of :mod:`.hf_static` instead.
- ``vllm`` (:mod:`.vllm`): vLLM's engine, a vLLM OpenAI server per replica on loopback.
- ``echo`` (:mod:`.echo`): no weights, no compute (routing tests, benchmarks of the serving path).
- ``provider`` (:mod:`.provider`): a hosted upstream from the version's ``Provider`` document — an OpenAI-compatible
  API, or Bedrock's Converse; no weights here.
"""

from __future__ import annotations

from typing import Any

from slipway.policies.servingconfig import ServingConfig
from slipway.serve.engines.base import Delta, Engine, EngineError, EngineRequest, Finish, collect, merge_logprobs

__all__ = ["Delta", "Engine", "EngineError", "EngineRequest", "Finish", "build_engine", "collect", "merge_logprobs"]


def build_engine(
    cfg: ServingConfig,
    *,
    uri: str | None,
    sha256: str | None,
    device: str | None,
    provider: dict[str, Any] | None = None,
) -> Engine:
    """The engine ``cfg`` asks for, with the version's weights loaded (checked against ``sha256``); for the
    ``provider`` backend, the upstream of ``provider`` (a Provider document as a mapping)."""
    if cfg.backend == "provider":
        from slipway.policies.provider import Provider
        from slipway.serve.engines.provider import provider_engine

        if provider is None:
            raise ValueError(f"{cfg.model}: the provider engine needs the version's Provider document")
        return provider_engine(Provider.model_validate(provider))
    if cfg.backend == "echo":
        from slipway.serve.engines.echo import EchoEngine

        return EchoEngine()
    if not uri:
        raise ValueError(f"{cfg.model}: the {cfg.backend} engine needs an artifact uri")
    if cfg.backend == "vllm":
        from slipway.llm.checkpoint import load_tokenizer
        from slipway.serve.engines.vllm import VLLMEngine, model_dir_for

        path = model_dir_for(uri, sha256, cfg.dtype)
        return VLLMEngine(cfg, path, load_tokenizer(path))
    from slipway.llm.checkpoint import load_causal_lm

    model, tok = load_causal_lm(uri, device=device, dtype=cfg.dtype, sha256=sha256)
    spec = cfg.engine
    if spec.batching == "static":
        from slipway.serve.engines.hf_static import HFStaticEngine

        return HFStaticEngine(
            model, tok, max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s
        )
    from slipway.serve.engines.hf import HFEngine

    return HFEngine(
        model,
        tok,
        max_seqs=cfg.max_batch_size,
        max_batch_tokens=spec.max_batch_tokens,
        kv_cache_tokens=cfg.kv_cache_tokens(on_gpu=str(next(model.parameters()).device).startswith("cuda")),
        page_size=spec.page_size,
        max_new_tokens=cfg.max_new_tokens,
        prefix_caching=spec.prefix_caching,
    )


def engine_request(
    req: dict[str, Any],
    prompt: str,
    *,
    stream: bool,
    request_id: str,
    prompt_ids: list[Any] | None = None,
    messages: list[dict[str, Any]] | None = None,
) -> EngineRequest:
    """The engine's view of a gateway payload (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``,
    ``deadline``, ``adapter``: the LoRA adapter of an adapter version); ``prompt_ids`` when the prompt has been
    tokenized already; ``messages``, a chat's messages as given, for an engine that applies the chat template
    upstream (a provider)."""
    return EngineRequest(
        request_id=request_id,
        prompt=prompt,
        prompt_ids=tuple(prompt_ids) if prompt_ids is not None else None,
        max_tokens=int(req["max_tokens"]),
        temperature=float(req.get("temperature") or 0.0),
        top_p=float(req.get("top_p") if req.get("top_p") is not None else 1.0),
        stop=tuple(req.get("stop") or ()),
        seed=req.get("seed"),
        deadline=req.get("deadline"),
        stream=stream,
        extra=tuple(sorted((req.get("extra") or {}).items())),
        echo=bool(req.get("echo")),
        prompt_is_tokens=isinstance(req.get("prompt"), list),
        adapter=req.get("adapter"),
        messages=tuple(dict(m) for m in messages) if messages else None,
    )

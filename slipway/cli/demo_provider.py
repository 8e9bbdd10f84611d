"""``make demo-provider``: replace a provider route with your own fine-tune, on one laptop and offline.

    python -m slipway.cli.demo_provider

1. bootstraps the tiny base model when ``SLIPWAY_HOME`` has none (``slipway bootstrap``);
2. starts the stand-in for a hosted model: vLLM's own OpenAI server (``make vllm-env``) on 127.0.0.1:8011 serving
   tiny-base's weights as ``tiny-upstream`` — what ``policies/providers/local-vllm.yaml`` points at;
3. runs ``promote-from-provider``: the provider registered as ``assistant``'s production version, a fine-tune
   evaluated against it at its upstream, gated, canaried beside it and promoted;
4. shows the versions (the provider's lineage), the traffic history and the cost by version: the provider's token
   spend, then the fine-tune's GPU-seconds. The upstream is stopped at the end (by its PID).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

console = Console()
PORT = 8011
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def _cli(*argv: str) -> int:
    from slipway.cli import main as cli

    console.print(f"\n[bold cyan]$ slipway {' '.join(argv)}[/]")
    return cli(list(argv))


def _vllm_python() -> str:
    py = os.environ.get("SLIPWAY_VLLM_PYTHON") or str(Path.cwd() / ".venv-vllm" / "bin" / "python")
    if not Path(py).is_file():
        console.print(f"[red]no vLLM environment at {py}: run `make vllm-env` (or set SLIPWAY_VLLM_PYTHON)[/]")
        sys.exit(2)
    return py


def start_upstream(model_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    """vLLM's OpenAI server for ``model_dir`` on loopback, in its own process group; returns once it answers."""
    import httpx

    template = Path(tempfile.mkdtemp(prefix="slipway-chat-")) / "chat.jinja"
    template.write_text(TEMPLATE)
    config = json.loads((model_dir / "config.json").read_text())  # the context the model was built with
    context = int(config.get("n_positions") or config.get("max_position_embeddings") or 512)
    cmd = [
        _vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "tiny-upstream", "--host", "127.0.0.1", "--port", str(PORT),
        "--max-model-len", str(min(512, context)), "--enforce-eager", "--chat-template", str(template),
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            console.print(f"[red]the upstream exited; see {log}[/]")
            sys.exit(1)
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)
            console.print(f"[red]the upstream did not answer within 600 s; see {log}[/]")
            sys.exit(1)
        time.sleep(1.0)


def main() -> int:
    from slipway.cli._context import open_registry
    from slipway.llm.checkpoint import local_dir, version_artifact
    from slipway.registry import NotFound, catalog

    t0 = time.perf_counter()
    reg = open_registry()
    try:
        with reg.session() as s:
            catalog.resolve(s, "tiny-base@production")
    except NotFound:
        if _cli("bootstrap") != 0:
            return 1
    _ref, uri, sha = version_artifact(reg, "tiny-base@production")
    home = Path(os.environ.get("SLIPWAY_HOME", ".slipway"))
    console.rule("[bold]the provider: vLLM's OpenAI server on 127.0.0.1:8011 (stands in for a hosted model)")
    proc = start_upstream(local_dir(uri, sha256=sha), home / "provider-upstream.log")
    try:
        console.print(f"upstream up after {time.perf_counter() - t0:.0f} s (pid {proc.pid})")
        rc = _cli("run", "promote-from-provider")
        _cli("versions", "list", "assistant")
        _cli("history", "assistant")
        _cli("cost", "report", "--by", "model,version")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    console.rule(
        f"[bold]promote-from-provider {'succeeded' if rc == 0 else 'failed'} in {time.perf_counter() - t0:.0f} s"
    )
    console.print(
        "assistant's production moved from the provider to the fine-tune; the endpoint keeps serving it "
        "(`slipway serve status`, `slipway serve down`)."
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())

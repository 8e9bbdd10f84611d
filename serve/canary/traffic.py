"""Synthetic traffic for demos, tests and benchmarks: open-loop requests at a fixed rate to an
OpenAI-compatible endpoint, each from a different ``user`` (routing is sticky per user), with every outcome
kept so failed client requests can be counted and timed."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


@dataclass
class Outcome:
    t: float  # seconds since the generator started, at send time
    status: int  # HTTP status, or 0 for a connection failure
    version: str | None  # x-slipway-version of the answer, when the gateway said


@dataclass
class Traffic:
    """Sends ``rps`` completions per second to ``base_url`` (the OpenAI base, ending in ``/v1``) until
    :meth:`stop` (at most ``max_s`` seconds)."""

    base_url: str
    api_key: str
    model: str
    prompts: Sequence[str]
    rps: float = 20.0
    max_tokens: int = 8
    max_s: float = 600.0
    timeout_s: float = 30.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.t0 = time.monotonic()

    def start(self) -> Traffic:
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="slipway-traffic", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5)
        with self._lock:
            return list(self.outcomes)

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        import httpx

        client = httpx.Client(
            base_url=self.base_url, timeout=self.timeout_s, headers={"Authorization": f"Bearer {self.api_key}"}
        )
        interval = 1.0 / self.rps
        with ThreadPoolExecutor(max_workers=max(4, int(self.rps * 2))) as pool:
            i = 0
            while not self._stop.is_set() and time.monotonic() - self.t0 < self.max_s:
                due = self.t0 + i * interval
                delay = due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                pool.submit(self._one, client, i)
                i += 1
        client.close()

    def _one(self, client: object, i: int) -> None:
        import httpx

        t = time.monotonic() - self.t0
        body = {
            "model": self.model,
            "prompt": self.prompts[i % len(self.prompts)],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "user": f"traffic-{i}",
        }
        try:
            r = client.post("/completions", json=body)  # type: ignore[attr-defined]
            out = Outcome(t, r.status_code, r.headers.get("x-slipway-version"))
        except httpx.HTTPError:
            out = Outcome(t, 0, None)
        with self._lock:
            self.outcomes.append(out)

    def failed(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.status == 0 or o.status >= 500]

"""The weight store: one named, detached Ray actor holding what every gateway replica must agree on.

It keeps, per model, the live versions (their Serve application, weight, shadow fraction and state) and the
model's serving config. Each gateway replica long-polls :meth:`WeightStore.wait`, so a change reaches every
replica within milliseconds — a handle call would reach only one replica, and redeploying the gateway would
restart it. Gateways also push their per-second metric buckets here, so the control plane reads windows
aggregated across all replicas without Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from typing import Any

from slipway.serve.pairs import PairQueues
from slipway.serve.windows import Bucket, SecondRing, summarize

STORE_NAME = "slipway-weight-store"
NAMESPACE = "slipway"
#: A replica that has not pushed for this long no longer counts for in-flight totals.
REPLICA_STALE_S = 10.0


class WeightStore:
    """Async actor; every method is cheap and runs on the actor's event loop (no locks needed)."""

    def __init__(self) -> None:
        self.rev = 0
        self.models: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Event()
        self.rings: dict[tuple[str, str], SecondRing] = {}
        self.inflight: dict[str, tuple[float, dict[str, dict[str, int]]]] = {}
        self.oldest: dict[str, tuple[float, dict[str, dict[str, float]]]] = {}  # replica -> (at, waited s)
        self.pairs = PairQueues()  # answer pairs of mirrored requests, drained by canary controllers

    # --- desired state ---------------------------------------------------------------------------------

    def _bump(self) -> int:
        self.rev += 1
        self._changed.set()
        self._changed = asyncio.Event()
        return self.rev

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        return self.rev, copy.deepcopy(self.models)

    async def wait(self, since: int, timeout_s: float = 30.0) -> tuple[int, dict[str, Any]]:
        """Return as soon as the revision differs from ``since`` (or after ``timeout_s``)."""
        if self.rev == since:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self.snapshot()

    def restore(self, rev: int, table: dict[str, Any]) -> int:
        """A restarted store (Ray re-creates the actor empty) takes back the routing table a gateway replica still
        holds; only a store that knows nothing yet accepts it, so the first replica to notice wins. The revision
        continues past the replica's, so every replica sees a change."""
        if self.models or not table:
            return self.rev
        self.models = copy.deepcopy(table)
        self.rev = max(self.rev, rev)
        return self._bump()

    def put_version(
        self,
        model: str,
        version: int,
        app: str,
        config: dict[str, Any],
        adapter: dict[str, Any] | None = None,
        kind: str | None = None,
        price: dict[str, float] | None = None,
    ) -> int:
        """Add a live version with weight 0 (weight 1 when it is the model's only version). An ``adapter``
        version (``{name, uri, sha256, base}``) is served by its base's application ``app``, whose replicas load
        it; the model's config stays the base's. ``kind: provider`` marks a hosted upstream (fallbacks order by
        it), ``price`` its per-token price (budgets charge its requests with it)."""
        m = self.models.setdefault(model, {"config": config, "versions": {}})
        if adapter is None:
            m["config"] = config
        first = not any(e["state"] == "live" for e in m["versions"].values())
        e = {"app": app, "weight": 1.0 if first else 0.0, "shadow": 0.0, "state": "live"}
        if adapter is not None:
            e["adapter"] = dict(adapter)
            e["holders"] = {}
        if kind is not None:
            e["kind"] = kind
        if price is not None:
            e["price"] = dict(price)
        m["versions"][str(version)] = e
        return self._bump()

    def adapter_loaded(self, model: str, version: int, replica: str, pid: int) -> int:
        """A base replica holds the adapter version now (read by ``control.deploy_version`` and status)."""
        e = self.models.get(model, {}).get("versions", {}).get(str(version))
        if e is None or "adapter" not in e or e["holders"].get(replica) == pid:
            return self.rev
        e["holders"][replica] = pid
        return self._bump()

    def adapter_unloaded(self, model: str, version: int, replica: str) -> int:
        e = self.models.get(model, {}).get("versions", {}).get(str(version))
        if e is None or e.get("holders", {}).pop(replica, None) is None:
            return self.rev
        return self._bump()

    def prune_holders(self, model: str, version: int, running: list[str]) -> int:
        """Forget the holders of an adapter version that are not among the ``running`` replicas (dead ones)."""
        e = self.models.get(model, {}).get("versions", {}).get(str(version))
        gone = [r for r in (e or {}).get("holders", {}) if r not in running]
        if not gone:
            return self.rev
        for r in gone:
            del e["holders"][r]
        return self._bump()

    def adapter_failed(self, model: str, version: int, reason: str) -> int:
        """A replica refused the adapter (its artifact failed the sha256 check): the version takes no traffic."""
        e = self.models.get(model, {}).get("versions", {}).get(str(version))
        if e is None or e["state"] == "failed":
            return self.rev
        e["state"], e["weight"], e["shadow"], e["error"] = "failed", 0.0, 0.0, reason
        return self._bump()

    def set_weights(self, model: str, weights: dict[str, float], shadow: dict[str, float]) -> int:
        versions = self.models[model]["versions"]
        for v, e in versions.items():
            e["weight"] = float(weights.get(v, 0.0))
            e["shadow"] = float(shadow.get(v, 0.0))
        return self._bump()

    def set_state(self, model: str, version: int, state: str) -> int:
        e = self.models[model]["versions"][str(version)]
        e["state"] = state
        if state != "live":
            e["weight"], e["shadow"] = 0.0, 0.0
        return self._bump()

    def drop_version(self, model: str, version: int) -> int:
        m = self.models.get(model)
        if m is not None:
            m["versions"].pop(str(version), None)
            if not m["versions"]:
                del self.models[model]
        return self._bump()

    def set_config(self, model: str, config: dict[str, Any]) -> int:
        self.models[model]["config"] = config
        return self._bump()

    def set_breaker(self, model: str, version: int, consecutive_errors: int | None) -> int:
        """Arm (or, with None, disarm) the in-gateway breaker of a version."""
        e = self.models[model]["versions"][str(version)]
        e["breaker"], e["tripped"] = consecutive_errors, None
        return self._bump()

    def trip(self, model: str, version: str, reason: str) -> int:
        """A gateway saw the breaker's threshold reached: weight and shadow of ``version`` to 0 at once, its
        share given to the other live versions in proportion. Idempotent."""
        versions = self.models.get(model, {}).get("versions", {})
        e = versions.get(str(version))
        if e is None or e.get("tripped"):
            return self.rev
        freed = e["weight"]
        e["weight"], e["shadow"], e["tripped"] = 0.0, 0.0, {"reason": reason, "at": time.time()}
        others = {v: x for v, x in versions.items() if v != str(version) and x["state"] == "live"}
        total = sum(x["weight"] for x in others.values())
        for x in others.values():
            x["weight"] = x["weight"] + freed * (x["weight"] / total) if total > 0 else freed / len(others)
        return self._bump()

    # --- metrics ---------------------------------------------------------------------------------------

    def push(
        self,
        replica: str,
        buckets: list[tuple[str, str, int, dict[str, Any]]],
        inflight: dict,
        oldest: dict[str, dict[str, float]] | None = None,
    ) -> None:
        """Merge one gateway replica's finished per-second buckets, its current in-flight counts and how long
        its oldest request in flight per version has waited."""
        for model, version, second, b in buckets:
            ring = self.rings.get((model, version))
            if ring is None:
                ring = self.rings[(model, version)] = SecondRing()
            ring.add(second, Bucket.from_dict(b))
        self.inflight[replica] = (time.time(), inflight)
        self.oldest[replica] = (time.time(), oldest or {})

    def metrics(self, model: str, *, seconds: float | None = None, last_n: int | None = None) -> dict[str, Any]:
        """Per-version summaries over the last ``seconds`` or the newest ``last_n`` requests (default 60 s)."""
        now = time.time()
        out: dict[str, Any] = {}
        for (m, v), ring in self.rings.items():
            if m != model:
                continue
            if last_n is not None:
                out[v] = summarize(ring.by_count(last_n))
            else:
                span = seconds or 60.0
                out[v] = summarize(ring.by_time(now, span), seconds=span)
        for at, ages in self.oldest.values():  # a request that never finishes is in no window: say how old
            if now - at >= REPLICA_STALE_S:
                continue
            for v, waited in ages.get(model, {}).items():
                entry = out.setdefault(v, {"requests": 0})
                # as of the replica's last push (not extrapolated: the request may have finished since)
                entry["oldest_inflight_ms"] = max(entry.get("oldest_inflight_ms", 0.0), waited * 1000)
        return out

    def inflight_total(self, model: str, version: int) -> int:
        now = time.time()
        return sum(
            counts.get(model, {}).get(str(version), 0)
            for ts, counts in self.inflight.values()
            if now - ts < REPLICA_STALE_S
        )

    def push_pairs(self, pairs: list[dict[str, Any]]) -> None:
        """Pairs of answers a gateway replica formed on mirrored requests (:mod:`slipway.serve.pairs`)."""
        self.pairs.push(pairs)

    def take_pairs(self, model: str, limit: int | None = None) -> list[dict[str, Any]]:
        """``model``'s pairs not taken yet (oldest first, at most ``limit``); taking removes them."""
        return self.pairs.take(model, limit)

    def counts(self, model: str, start: int, end: int) -> dict[str, dict[str, int]]:
        """Per version, requests and 5xx errors in the whole seconds ``start <= second < end`` (epoch): consecutive
        calls over adjacent spans count each request once (the sequential error-rate test's increments)."""
        out: dict[str, dict[str, int]] = {}
        for (m, v), ring in self.rings.items():
            if m != model:
                continue
            requests = errors = 0
            for second, b in ring.buckets.items():
                if start <= second < end:
                    requests, errors = requests + b.requests, errors + b.errors
            out[v] = {"requests": requests, "errors": errors}
        return out

    def reset_metrics(self, model: str | None = None) -> None:
        for key in [k for k in self.rings if model is None or k[0] == model]:
            del self.rings[key]


def get_store(*, create: bool = True) -> Any:
    """The store's actor handle, created detached on first use. Needs a connected Ray."""
    import ray

    if not create:
        return ray.get_actor(STORE_NAME, namespace=NAMESPACE)
    actor = ray.remote(WeightStore).options(
        name=STORE_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        # On the head node, like Serve's controller: worker nodes (GPU groups) come and go, the routing table must not.
        resources={"node:__internal_head__": 0.001},
        scheduling_strategy="DEFAULT",
        max_concurrency=1000,
        max_restarts=-1,
    )
    return actor.remote()

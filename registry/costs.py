"""What serving cost, per model, version, API key, team and UTC day — computed in SQL.

GPU (and CPU) time comes from deployment records: each Ray Serve application holds ``replicas x num_gpus``
GPUs from its ``created_at`` until its ``removed_at`` (or the end of the period while it is live). Weight
changes (rollout events) do not free GPUs — a version at weight 0 still holds its replicas until its
application is removed — so time is taken from deployments, not from weights.

A version's compute cost in a day is **apportioned to requests** by their share of the tokens that version
generated that day (cache hits used no GPU and weigh nothing); the usage records carry no replica id, so the
version's replicas are treated as one pool. Compute nobody used stays visible as idle (no key). Models with an
external provider's token price are billed per token instead. The heavy part — grouping usage rows — and the
apportioning (a window function over the groups) run in the database; Python only splits the few deployment
intervals into days. A provider version (``params.source: provider``) is billed per token at its own Provider
document's price, and its replicas (CPU only) as compute: when a fine-tune replaces it, the report shows its token
spend give way to the fine-tune's GPU-seconds.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import and_, case, cast, func, literal, or_, select
from sqlalchemy.orm import Session

from slipway.registry import audit
from slipway.registry.models import ApiKey, CostReport, Deployment, Model, ModelVersion, UsageDaily, UsageRecord

if TYPE_CHECKING:
    from slipway.policies.costbudget import Pricing

IDLE = "(idle)"
_LIVE = ("deploying", "live", "draining")


@dataclass(frozen=True)
class ComputeSlice:
    """One version's compute inside one UTC day of the period."""

    model: str
    version: int
    day: str
    gpu_seconds: float
    cpu_seconds: float
    cost: float


def compute_slices(s: Session, *, since: dt.datetime, until: dt.datetime, pricing: Pricing) -> list[ComputeSlice]:
    """GPU- and CPU-seconds and their cost per (model, version, UTC day) within ``[since, until)``."""
    q = (
        select(Deployment, Model.name, ModelVersion.version)
        .join(Model, Model.id == Deployment.model_id)
        .join(ModelVersion, ModelVersion.id == Deployment.version_id)
        .where(Deployment.created_at < until, or_(Deployment.removed_at.is_(None), Deployment.removed_at > since))
    )
    acc: dict[tuple[str, int, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for d, model, version in s.execute(q):
        end = d.removed_at or (until if d.status in _LIVE else d.created_at)
        start, end = max(d.created_at, since), min(end, until)
        cpus = float(((d.config or {}).get("ray_actor_options") or {}).get("num_cpus") or 1.0)
        for day, seconds in _split_days(start, end):
            a = acc[(model, version, day)]
            if d.num_gpus > 0:
                gpu_s = d.replicas * d.num_gpus * seconds
                a[0] += gpu_s
                a[2] += gpu_s / 3600.0 * pricing.gpu_hour(d.accelerator)
            else:
                cpu_s = d.replicas * cpus * seconds
                a[1] += cpu_s
                a[2] += cpu_s / 3600.0 * pricing.cpu_hour
    return [ComputeSlice(m, v, day, *a) for (m, v, day), a in sorted(acc.items())]


def _split_days(start: dt.datetime, end: dt.datetime) -> list[tuple[str, float]]:
    out = []
    while start < end:
        next_day = dt.datetime.combine(start.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
        stop = min(end, next_day)
        out.append((start.strftime("%Y-%m-%d"), (stop - start).total_seconds()))
        start = stop
    return out


MEASURES = ("requests", "prompt_tokens", "completion_tokens", "gpu_seconds", "compute_cost", "token_cost", "cost")
DIMENSIONS = ("model", "version", "key", "team", "day")


LATE_DAYS = 2  # whole days re-summed at every refresh, for usage rows that arrive late


def _floor_day(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _usage_sums(s: Session, *where: Any) -> Any:
    """Usage rows summed per model, version, key and UTC day (``day`` as YYYY-MM-DD text)."""
    pg = s.get_bind().dialect.name == "postgresql"
    day = func.date(func.timezone("UTC", UsageRecord.ts)) if pg else func.date(UsageRecord.ts)
    cached = UsageRecord.cache_hit.is_(True)
    return (
        select(
            UsageRecord.model.label("model"),
            UsageRecord.version.label("version"),
            UsageRecord.api_key_id.label("key_id"),
            cast(day, sa.String).label("day"),
            func.count().label("requests"),
            func.sum(UsageRecord.prompt_tokens).label("p"),
            func.sum(UsageRecord.completion_tokens).label("c"),
            # tokens that reached a model (cache hits used no GPU and no provider)
            func.sum(case((cached, 0), else_=UsageRecord.prompt_tokens)).label("wp"),
            func.sum(case((cached, 0), else_=UsageRecord.completion_tokens)).label("wc"),
        )
        .where(*where)
        .group_by(UsageRecord.model, UsageRecord.version, UsageRecord.api_key_id, day)
    )


def refresh_daily(s: Session, *, until: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
    """Sum the usage of whole UTC days before ``until``'s day (and before today) into ``usage_daily``.

    Incremental: from the last day already summed minus :data:`LATE_DAYS` (everything the first time). Returns
    the range re-summed, or None when there was nothing to do. Rows written more than LATE_DAYS days late are
    not seen by reports until their day is re-summed (delete its usage_daily rows).
    """
    stop = min(_floor_day(until), _floor_day(dt.datetime.now(dt.UTC)))
    last = s.scalar(select(func.max(UsageDaily.day)))
    if last is not None:
        start = dt.datetime.fromisoformat(last).replace(tzinfo=dt.UTC) - dt.timedelta(days=LATE_DAYS - 1)
    else:
        first = s.scalar(select(func.min(UsageRecord.ts)))
        if first is None:
            return None
        start = _floor_day(first)
    if start >= stop:
        return None
    lo, hi = start.strftime("%Y-%m-%d"), stop.strftime("%Y-%m-%d")
    s.execute(sa.delete(UsageDaily).where(UsageDaily.day >= lo, UsageDaily.day < hi))
    cols = ["model", "version", "api_key_id", "day", "requests", "prompt_tokens", "completion_tokens"]
    cols += ["billable_prompt_tokens", "billable_completion_tokens"]
    s.execute(sa.insert(UsageDaily).from_select(cols, _usage_sums(s, UsageRecord.ts >= start, UsageRecord.ts < stop)))
    return start, stop


def detail_select(s: Session, *, since: dt.datetime, until: dt.datetime, pricing: Pricing) -> Any:
    """Spend per (model, version, key, team, day): usage grouped and compute apportioned, in one statement.

    Whole days already in ``usage_daily`` are read from it; the rest of the period from the usage rows.
    """
    slices = compute_slices(s, since=since, until=until, pricing=pricing)
    roll_from = _floor_day(since) + (dt.timedelta(days=1) if since != _floor_day(since) else dt.timedelta())
    last = s.scalar(select(func.max(UsageDaily.day)))
    rolled_until = dt.datetime.fromisoformat(last).replace(tzinfo=dt.UTC) + dt.timedelta(days=1) if last else since
    roll_to = min(_floor_day(until), rolled_until)
    in_period = (UsageRecord.ts >= since, UsageRecord.ts < until)
    if roll_from < roll_to:
        rolled = select(
            UsageDaily.model.label("model"),
            UsageDaily.version.label("version"),
            UsageDaily.api_key_id.label("key_id"),
            UsageDaily.day.label("day"),
            UsageDaily.requests.label("requests"),
            UsageDaily.prompt_tokens.label("p"),
            UsageDaily.completion_tokens.label("c"),
            UsageDaily.billable_prompt_tokens.label("wp"),
            UsageDaily.billable_completion_tokens.label("wc"),
        ).where(UsageDaily.day >= roll_from.strftime("%Y-%m-%d"), UsageDaily.day < roll_to.strftime("%Y-%m-%d"))
        raw = _usage_sums(s, *in_period, or_(UsageRecord.ts < roll_from, UsageRecord.ts >= roll_to))
        usage = sa.union_all(raw, rolled).cte("usage")
    else:
        usage = _usage_sums(s, *in_period).cte("usage")
    # Compute per version-day and token prices travel as VALUES lists (a placeholder row keeps them valid SQL).
    compute = (
        sa.values(
            sa.column("model", sa.String),
            sa.column("version", sa.Integer),
            sa.column("day", sa.String),
            sa.column("gpu_s", sa.Float),
            sa.column("cost", sa.Float),
            name="compute",
        )
        .data([(c.model, c.version, c.day, c.gpu_seconds, c.cost) for c in slices] or [("", -1, "", 0.0, 0.0)])
        .cte("compute")
    )
    prices = (
        sa.values(sa.column("model", sa.String), sa.column("pp", sa.Float), sa.column("cp", sa.Float), name="prices")
        .data([(t.model, t.prompt_per_1k, t.completion_per_1k) for t in pricing.external()] or [("", 0.0, 0.0)])
        .cte("prices")
    )
    # A provider version's own price (its Provider document's) wins over its model's external price.
    vprices = (
        sa.values(
            sa.column("model", sa.String),
            sa.column("version", sa.Integer),
            sa.column("pp", sa.Float),
            sa.column("cp", sa.Float),
            name="version_prices",
        )
        .data(provider_prices(s) or [("", -1, 0.0, 0.0)])
        .cte("version_prices")
    )
    u_day = cast(usage.c.day, sa.String)
    weight = cast(usage.c.wp + usage.c.wc, sa.Float)
    pool = func.sum(weight).over(partition_by=[usage.c.model, usage.c.version, u_day])
    share = case((pool > 0, weight / pool), else_=0.0)
    pp = func.coalesce(vprices.c.pp, prices.c.pp, 0.0)
    cp = func.coalesce(vprices.c.cp, prices.c.cp, 0.0)
    token_cost = (usage.c.wp * pp + usage.c.wc * cp) / 1000.0
    compute_cost = func.coalesce(compute.c.cost, 0.0) * share
    used = (
        select(
            usage.c.model,
            usage.c.version,
            ApiKey.name.label("key"),
            ApiKey.team.label("team"),
            u_day.label("day"),
            usage.c.requests,
            usage.c.p.label("prompt_tokens"),
            usage.c.c.label("completion_tokens"),
            (func.coalesce(compute.c.gpu_s, 0.0) * share).label("gpu_seconds"),
            compute_cost.label("compute_cost"),
            token_cost.label("token_cost"),
            (compute_cost + token_cost).label("cost"),
        )
        .select_from(usage)
        .outerjoin(ApiKey, ApiKey.id == usage.c.key_id)
        .outerjoin(
            compute,
            and_(compute.c.model == usage.c.model, compute.c.version == usage.c.version, compute.c.day == u_day),
        )
        .outerjoin(prices, prices.c.model == usage.c.model)
        .outerjoin(vprices, and_(vprices.c.model == usage.c.model, vprices.c.version == usage.c.version))
    )
    used_pool = (
        select(usage.c.model, usage.c.version, u_day.label("day"))
        .where(usage.c.wp + usage.c.wc > 0)
        .subquery("used_pool")
    )
    idle = (
        select(
            compute.c.model,
            compute.c.version,
            literal(IDLE, sa.String).label("key"),
            literal(None, sa.String).label("team"),
            compute.c.day,
            literal(0).label("requests"),
            literal(0).label("prompt_tokens"),
            literal(0).label("completion_tokens"),
            compute.c.gpu_s.label("gpu_seconds"),
            compute.c.cost.label("compute_cost"),
            literal(0.0).label("token_cost"),
            compute.c.cost.label("cost"),
        )
        .where(compute.c.version >= 0)
        .where(
            ~sa.exists().where(
                used_pool.c.model == compute.c.model,
                used_pool.c.version == compute.c.version,
                used_pool.c.day == compute.c.day,
            )
        )
    )
    return sa.union_all(used, idle)


def provider_prices(s: Session) -> list[tuple[str, int, float, float]]:
    """``(model, version, $/1k prompt, $/1k completion)`` of every provider version with a price: the version's
    ``params`` hold its Provider document (``source: provider``), whose ``price`` is what the upstream bills."""
    q = select(Model.name, ModelVersion.version, ModelVersion.params).join(Model, Model.id == ModelVersion.model_id)
    out = []
    for model, version, params in s.execute(q):
        price = (
            ((params or {}).get("provider") or {}).get("price") if (params or {}).get("source") == "provider" else None
        )
        if price:
            out.append((model, version, float(price["prompt_per_1k"]), float(price["completion_per_1k"])))
    return out


class CostDetail:
    """The spend of a period materialised once, in a temporary table on the session's connection, so that every
    roll-up (rows, days, budgets, forecast) is a small GROUP BY in SQL rather than another scan of the usage.
    Use it inside one session and :meth:`drop` it when done."""

    def __init__(self, s: Session, *, since: dt.datetime, until: dt.datetime, pricing: Pricing) -> None:
        self.s = s
        self.table = sa.Table(
            f"cost_detail_{uuid.uuid4().hex[:8]}",
            sa.MetaData(),
            sa.Column("model", sa.String(200)),
            sa.Column("version", sa.Integer),
            sa.Column("key", sa.String(200)),
            sa.Column("team", sa.String(200)),
            sa.Column("day", sa.String(10)),
            *[sa.Column(m, sa.BigInteger) for m in MEASURES[:3]],
            *[sa.Column(m, sa.Float) for m in MEASURES[3:]],
            prefixes=["TEMPORARY"],
        )
        pg = s.get_bind().dialect.name == "postgresql"
        if pg:  # hash the groups and sort the partitions in memory; only for this transaction
            s.execute(sa.text("SET LOCAL work_mem = '256MB'"))
        self.table.create(s.connection())
        refresh_daily(s, until=until)
        detail = detail_select(s, since=since, until=until, pricing=pricing)
        s.execute(sa.insert(self.table).from_select([c.name for c in self.table.columns], detail))
        if pg:
            s.execute(sa.text(f"ANALYZE {self.table.name}"))

    def rollup(
        self, dims: list[str] | tuple[str, ...], *, day_from: str | None = None, **equal: Any
    ) -> list[dict[str, Any]]:
        """Sums of the measures per value of ``dims``, from ``day_from`` on, where each ``equal`` column matches."""
        t = self.table
        q = select(*[t.c[d] for d in dims], *[func.coalesce(func.sum(t.c[m]), 0).label(m) for m in MEASURES])
        if day_from is not None:
            q = q.where(t.c.day >= day_from)
        for col, value in equal.items():
            q = q.where(t.c[col] == value)
        if dims:
            q = q.group_by(*[t.c[d] for d in dims]).order_by(*[t.c[d] for d in dims])
        out = []
        for r in self.s.execute(q):
            row = dict(r._mapping)
            for m in MEASURES:
                row[m] = int(row[m]) if m in MEASURES[:3] else float(row[m])
            out.append(row)
        return out

    def drop(self) -> None:
        self.table.drop(self.s.connection())


def record_report(
    s: Session,
    *,
    period_start: dt.datetime,
    period_end: dt.datetime,
    budget: str,
    total: float,
    forecast: float,
    gpu_seconds: float,
    summary: dict[str, Any],
    artifacts: dict[str, str],
    pipeline_run_id: str | None = None,
) -> CostReport:
    """Record that a cost report was made (and where its files are); audited."""
    audit.lock_chain(s)
    r = CostReport(
        period_start=period_start,
        period_end=period_end,
        budget=budget,
        total=total,
        forecast=forecast,
        gpu_seconds=gpu_seconds,
        summary=audit.jsonable(summary),
        artifacts=dict(artifacts),
        pipeline_run_id=pipeline_run_id,
        created_by=s.info.get("actor", "unknown"),
    )
    s.add(r)
    s.flush()
    audit.append(
        s,
        action="cost.report",
        target=f"cost_report:{r.id}",
        after={"period": [period_start, period_end], "total": round(total, 6), "artifacts": artifacts},
    )
    return r


def latest_reports(s: Session, *, limit: int = 10) -> list[CostReport]:
    return list(s.scalars(select(CostReport).order_by(CostReport.id.desc()).limit(limit)))

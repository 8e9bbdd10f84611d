"""Rate limits across gateway replicas, usage records after a burst, and the response cache."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from sqlalchemy import func, select

from tests.plugins.serving import ECHO, TINY
from tests.serve.test_routing import _burst

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]


def test_rpm_exceeded_is_429_with_retry_after_and_ratelimit_headers(stack):
    secret = stack.key(rpm=5)
    rs = [
        httpx.post(
            f"{stack.base_url}/v1/completions",
            json={"model": ECHO, "prompt": "x", "max_tokens": 1},
            headers={"Authorization": f"Bearer {secret}"},
        )
        for _ in range(7)
    ]
    codes = [r.status_code for r in rs]
    assert codes[:5] == [200] * 5 and codes[5:] == [429, 429], codes
    r = rs[-1]
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-limit-requests"] == "5"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert rs[0].headers["x-ratelimit-remaining-requests"] == "4"


def test_rpm_holds_across_two_gateway_replicas_with_redis(stack):
    if not stack.redis_url:
        pytest.skip("Redis unreachable")
    secret = stack.key(rpm=20)
    bodies = [{"model": ECHO, "prompt": "x", "max_tokens": 1} for _ in range(60)]
    # new connections per request spread over both gateway replicas
    rs = _burst(stack.base_url, secret, bodies, concurrency=12)
    ok = sum(r.status_code == 200 for r in rs)
    assert all(r.status_code in (200, 429) for r in rs)
    assert 20 <= ok <= 21, ok  # one token may refill during the burst


def test_tpm_limits_tokens(stack):
    secret = stack.key(tpm=40)
    body = {"model": ECHO, "prompt": "x", "max_tokens": 16}
    codes = [
        httpx.post(
            f"{stack.base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
        ).status_code
        for _ in range(4)
    ]
    assert codes[:2] == [200, 200] and 429 in codes[2:]


def test_usage_records_equal_answered_requests_after_a_burst(stack):
    from slipway.registry.models import ApiKey, UsageRecord

    secret = stack.key()
    # greedy: sampled at OpenAI's default temperature 1, the untrained tiny model ends some answers at once (an
    # end-of-sequence first token, 0 completion tokens), which the row check below would take for a lost count
    bodies = [
        {"model": ECHO if i % 4 else TINY, "prompt": f"burst {i}", "max_tokens": 2, "temperature": 0}
        for i in range(300)
    ]
    rs = _burst(stack.base_url, secret, bodies, concurrency=32)
    answered = sum(r.status_code == 200 for r in rs)
    assert answered == 300
    ids = {r.json()["id"].split("-", 1)[1] for r in rs}
    deadline = time.monotonic() + 15
    while True:
        with stack.registry.session() as s:
            key_id = s.scalar(select(ApiKey.id).order_by(ApiKey.id.desc()).limit(1))
            n = s.scalar(select(func.count()).where(UsageRecord.api_key_id == key_id, UsageRecord.status == 200))
        if n >= answered or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert n == answered
    with stack.registry.session() as s:
        rows = s.scalars(select(UsageRecord).where(UsageRecord.api_key_id == key_id)).all()
    assert {r.request_id for r in rows} == ids
    bad = [
        (r.model, r.completion_tokens, r.latency_ms, r.version, r.batch_size)
        for r in rows
        if not (r.completion_tokens > 0 and r.latency_ms > 0 and r.version)
    ]
    assert not bad, bad[:5]
    assert max(r.batch_size or 0 for r in rows) > 1


def test_temperature_zero_answer_is_served_from_cache_and_recorded(stack):
    if not stack.redis_url:
        pytest.skip("Redis unreachable")
    from slipway.registry.models import UsageRecord

    secret = stack.key()
    body = {"model": TINY, "prompt": "cache me please", "max_tokens": 5, "temperature": 0}
    h = {"Authorization": f"Bearer {secret}"}
    first = httpx.post(f"{stack.base_url}/v1/completions", json=body, headers=h)
    second = httpx.post(f"{stack.base_url}/v1/completions", json=body, headers=h)
    assert first.status_code == second.status_code == 200
    assert "x-slipway-cache" not in first.headers and second.headers["x-slipway-cache"] == "hit"
    assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    rid = second.json()["id"].split("-", 1)[1]
    deadline = time.monotonic() + 10
    row = None
    while row is None and time.monotonic() < deadline:
        with stack.registry.session() as s:
            row = s.scalar(select(UsageRecord).where(UsageRecord.request_id == rid))
        time.sleep(0.2)
    assert row is not None and row.cache_hit is True


def test_budget_hard_limit_holds_under_32_concurrent_streams_then_refuses_the_team(stack):
    """32 streamed requests at once against a $2 team budget: reservations admit only what fits, the spend
    recorded never passes the limit by more than one reservation, and the team's keys then get 429
    insufficient_quota (OpenAI error JSON) while other keys are served."""
    if not stack.redis_url:
        pytest.skip("Redis unreachable")
    import asyncio
    import datetime as dt

    from slipway.registry.models import UsageRecord
    from slipway.serve.budget import RedisLedger, window_id
    from tests.plugins.serving import BUDGET_HARD, BUDGET_NAME, BUDGET_TEAM

    secret = stack.key(team=BUDGET_TEAM)
    prompt, max_tokens = "one two three four", 16
    # the hold: prompt bytes (a token is at least one byte) + max_tokens, at $0.01 a token
    reservation = (len(prompt.encode()) + max_tokens) * 0.01

    async def one(client: httpx.AsyncClient) -> tuple[int, str]:
        body = {"model": ECHO, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
        async with client.stream(
            "POST", f"{stack.base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
        ) as r:
            text = "".join([chunk async for chunk in r.aiter_text()])
            return r.status_code, text

    async def burst() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(one(client) for _ in range(32)))

    results = asyncio.run(burst())
    codes = [c for c, _t in results]
    ok = [t for c, t in results if c == 200]
    assert set(codes) <= {200, 429} and 0 < len(ok) < 32, codes
    assert all(t.rstrip().endswith("data: [DONE]") for t in ok)  # admitted streams ran to the end
    refused = next(t for c, t in results if c == 429)
    err = json.loads(refused)["error"]
    assert (err["type"], err["code"]) == ("insufficient_quota", "insufficient_quota")
    assert BUDGET_NAME in err["message"] and "exhausted" in err["message"]

    ledger = RedisLedger(stack.redis_url)
    bucket = f"{BUDGET_NAME}:{window_id('day', dt.datetime.now(dt.UTC))}"
    deadline = time.monotonic() + 10
    while ledger.totals(bucket)[1] > 0 and time.monotonic() < deadline:  # settles are spawned after the stream
        time.sleep(0.1)
    spent, held = (x / 1_000_000 for x in ledger.totals(bucket))
    assert held == 0
    assert spent <= BUDGET_HARD + reservation, (spent, len(ok))
    # every admitted stream was charged what it really cost: 4 prompt + 16 completion tokens at $0.01
    assert spent == pytest.approx(len(ok) * (4 + 16) * 0.01)

    # What the burst's holds kept out fits now that it settled below its estimates: spend it until refused.
    extra = []
    for _ in range(5):
        extra.append(
            httpx.post(
                f"{stack.base_url}/v1/completions",
                json={"model": ECHO, "prompt": prompt, "max_tokens": max_tokens},
                headers={"Authorization": f"Bearer {secret}"},
            )
        )
        if extra[-1].status_code != 200:
            break
    again = extra[-1]
    assert again.status_code == 429 and again.json()["error"]["code"] == "insufficient_quota", again.text
    answered = len(ok) + len(extra) - 1
    spent = ledger.totals(bucket)[0] / 1_000_000
    assert spent == pytest.approx(answered * (4 + 16) * 0.01) and BUDGET_HARD - reservation < spent <= BUDGET_HARD
    other = httpx.post(
        f"{stack.base_url}/v1/completions",
        json={"model": ECHO, "prompt": prompt, "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {stack.key(team='other-team')}"},
    )
    assert other.status_code == 200
    # the refusals are usage records too (status 429, no tokens), next to the answered requests
    from slipway.registry.models import ApiKey

    with stack.registry.session() as s:
        key_id = s.scalar(select(ApiKey.id).where(ApiKey.team == BUDGET_TEAM).order_by(ApiKey.id.desc()).limit(1))
    deadline = time.monotonic() + 10
    while True:
        with stack.registry.session() as s:
            rows = s.scalars(select(UsageRecord).where(UsageRecord.api_key_id == key_id)).all()
        statuses = sorted(r.status for r in rows)
        done = statuses.count(429) > codes.count(429) and statuses.count(200) >= answered
        if done or time.monotonic() > deadline:  # each gateway replica writes its rows every 0.5 s
            break
        time.sleep(0.2)
    assert statuses.count(200) == answered and statuses.count(429) == codes.count(429) + 1, statuses
    assert all(r.completion_tokens == 0 for r in rows if r.status == 429)


def test_opted_in_model_exchanges_are_logged_redacted_and_encrypted(stack, prompt_log_vault):
    """The gateway logs exchanges with ``tiny`` (opted in): the stored object holds only Vault-transit ciphertext,
    and decrypted, the prompt has its email and card number redacted; ``echo`` (not opted in) is not logged."""
    from slipway.artifacts import open_store
    from slipway.secrets import VaultClient, VaultSettings
    from slipway.serve import promptlog
    from slipway.serve.promptlog import TransitEncryptor
    from tests.plugins.serving import PROMPT_LOG_KEY

    client = stack.client(stack.key())
    pii = "mail ana.lopez@example.org card 4111 1111 1111 1111"
    r = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": pii}], max_tokens=4)
    client.completions.create(model=ECHO, prompt=pii, max_tokens=2)
    rid = r.id.split("-", 1)[1]
    store = open_store(prompt_log_vault.artifact_root)
    enc = TransitEncryptor(
        VaultClient(VaultSettings(addr=prompt_log_vault.url, token=prompt_log_vault.token)), PROMPT_LOG_KEY
    )
    found, deadline = None, time.monotonic() + 15
    while found is None and time.monotonic() < deadline:
        for key in store.list("prompt-logs"):
            records = promptlog.read(store, key, enc)
            found = next(((key, rec) for rec in records if rec["request_id"] == rid), None) or found
        time.sleep(0.3)
    assert found is not None, store.list("prompt-logs")
    key, rec = found
    assert key.startswith(f"prompt-logs/{TINY}/")
    assert rec["prompt"] == [{"role": "user", "content": "mail [EMAIL] card [CARD]"}]
    assert rec["response"] == r.choices[0].message.content and rec["model"] == TINY and rec["version"] == 1
    raw = store.read_bytes(key).decode()
    assert (
        "example.org" not in raw
        and "4111" not in raw
        and json.loads(raw)["envelope"]["ciphertext"].startswith("vault:v")
    )
    assert not any(k.startswith(f"prompt-logs/{ECHO}/") for k in store.list("prompt-logs"))

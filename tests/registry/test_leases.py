"""The promotion lease: one active promotion per model; a crashed holder's lease expires."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from slipway.registry import LeaseHeld, audit, catalog, leases


@pytest.fixture
def demo(registry):
    with registry.session() as s:
        catalog.create_model(s, name="demo")
    return registry


def test_second_promotion_is_refused_naming_the_running_one(demo):
    with demo.session() as s:
        leases.acquire(s, model="demo", holder="flow-a", run_id="run-a")
    with pytest.raises(LeaseHeld, match=r"promotion of 'demo' is already running: held by flow-a \(run run-a\)") as e:
        with demo.session() as s:
            leases.acquire(s, model="demo", holder="flow-b", run_id="run-b")
    assert str(e.value).endswith("if that process is gone, `slipway reconcile --model demo` aborts it "
                                 "(the scheduled reconcile does too)")  # fmt: skip
    with demo.session() as s:
        assert leases.current(s, model="demo").holder == "flow-a"


def test_expired_lease_can_be_taken_over(demo):
    with demo.session() as s:
        leases.acquire(s, model="demo", holder="crashed", ttl=dt.timedelta(seconds=-1))
        leases.acquire(s, model="demo", holder="new")
        assert leases.current(s, model="demo").holder == "new"
        takeover = audit.list_events(s, action="lease.acquire", limit=1)[0]
    assert takeover.before["holder"] == "crashed" and takeover.before["expired"] is True


def test_release_frees_the_lease_only_for_its_holder(demo):
    with demo.session() as s:
        leases.acquire(s, model="demo", holder="a")
        assert leases.release(s, model="demo", holder="b") is False
        assert leases.release(s, model="demo", holder="a") is True
        assert leases.current(s, model="demo") is None
        leases.acquire(s, model="demo", holder="b")


def test_renew_fails_for_a_holder_that_lost_the_lease(demo):
    with demo.session() as s:
        leases.acquire(s, model="demo", holder="a", ttl=dt.timedelta(seconds=-1))
        leases.acquire(s, model="demo", holder="b")
    with pytest.raises(LeaseHeld, match="a no longer holds"), demo.session() as s:
        leases.renew(s, model="demo", holder="a")


def test_eight_racing_promotions_exactly_one_gets_the_lease(demo):
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def worker(i):
        barrier.wait()
        try:
            with demo.session() as s:
                leases.acquire(s, model="demo", holder=f"flow-{i}")
            outcomes.append("won")
        except LeaseHeld:
            outcomes.append("refused")
        except Exception as e:
            outcomes.append(f"error: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["refused"] * 7 + ["won"], outcomes
    with demo.session() as s:
        assert len(audit.list_events(s, action="lease.acquire")) == 1

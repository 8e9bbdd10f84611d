"""Promotion keeps the old champion deployed for a bake time and gives production back to it when the new
version fails meanwhile. Serving is ``FakeServing`` (``test_canary_controller.py``)."""

from __future__ import annotations

import pytest

from slipway.registry import catalog
from slipway.serve.canary import promotion
from slipway.serve.canary.promotion import PromotionError
from tests.serve.test_canary_controller import controller, world  # noqa: F401  (world is a fixture)


def _promote(world, check, bake_s=5.0):  # noqa: F811
    reg, serving, clock, run_id = world
    ctl, holder = controller(world)
    assert ctl.run().outcome == "completed"
    return promotion.promote(
        reg, serving, model="demo", candidate=2, holder=holder, run_id=run_id,
        bake_s=bake_s, bake_check=check, clock=clock, sleep=clock.sleep,
    )  # fmt: skip


def test_the_champion_stays_deployed_through_the_bake_then_is_retired(world):  # noqa: F811
    reg, serving, clock, _run = world
    seen: list[tuple[float, bool]] = []

    def check():
        seen.append((clock(), "1" in serving.apps))
        return None

    start = clock()
    out = _promote(world, check)

    assert out == {"production": 2, "previous": 1}
    assert all(champion_deployed for _t, champion_deployed in seen) and seen[-1][0] - seen[0][0] >= 5.0
    assert clock() - start >= 5.0 and 1 in serving.removed and serving.weights == {"2": 1.0}
    with reg.session() as s:
        assert catalog.get_version(s, "demo", 1).status == "archived"


def test_a_failure_during_the_bake_puts_production_back_on_the_champion(world):  # noqa: F811
    reg, serving, clock, _run = world
    t0 = clock()

    def check():
        return "unhealthy in Serve: deployment ModelServer is UNHEALTHY" if clock() - t0 > 2 else None

    with pytest.raises(PromotionError, match=r"demo:2 failed during the 5 s bake .*production is back on demo:1"):
        _promote(world, check)

    assert serving.weights == {"1": 1.0} and 1 not in serving.removed and 2 in serving.removed
    with reg.session() as s:
        assert catalog.get_alias(s, "demo", "production").version.version == 1
        assert catalog.get_version(s, "demo", 1).status == "production"
        v2 = catalog.get_version(s, "demo", 2)
        assert v2.status == "rejected" and "bake: unhealthy in Serve" in v2.status_reason

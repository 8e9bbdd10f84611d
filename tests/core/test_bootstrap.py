"""``slipway bootstrap`` is idempotent and never undoes a promotion: re-running it (as the demo does) reuses the
base and leaves ``production`` where a promotion put it."""

from __future__ import annotations

from slipway.llm.bootstrap import Recipe, bootstrap
from slipway.registry import catalog

QUICK = Recipe(pretrain_steps=0, n_layer=1, n_embd=32, n_head=2, vocab_size=512)


def test_second_bootstrap_reuses_the_base_and_keeps_a_promoted_production(sqlite_registry, slipway_home):
    first = bootstrap(sqlite_registry, recipe=QUICK)
    assert not first.reused_model and first.production == first.version == "tiny-base:1"
    with sqlite_registry.session() as s:  # registered with its model card (a compliance rule requires one)
        assert "model_card" in {a.kind for a in catalog.resolve(s, "tiny-base:1").artifacts}
    with sqlite_registry.session() as s:  # a promotion moves production to a fine-tuned version
        v2 = catalog.create_version(s, model="tiny-base", base=catalog.resolve(s, "tiny-base:1"))
        catalog.set_alias(s, model="tiny-base", alias="production", version=v2.version)
    again = bootstrap(sqlite_registry, recipe=QUICK)
    assert again.reused_model and again.version == "tiny-base:1"
    assert again.production == "tiny-base:2"
    with sqlite_registry.session() as s:
        assert catalog.resolve(s, "tiny-base@production").version == 2
        assert len(catalog.list_versions(s, "tiny-base")) == 2

"""Evaluation of a model version: running an EvalSuite (``suite``), recording it in the registry (``service``)
and the gate decision's statistics (``gate``). The per-example metrics are :mod:`slipway.metrics` and the paired
tests :mod:`slipway.stats` (pure modules the documents use too)."""

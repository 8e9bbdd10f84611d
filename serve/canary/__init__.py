"""Canary rollouts: the controller that walks a CanaryPlan, analyses windows, promotes or rolls back.

It lives in serve, not flows, because of who calls it: the controller drives :mod:`slipway.serve.control` and
reads the gateway's windows, and needs no orchestrator (``bench/canary.py`` and the tests run it directly);
``promotion`` is shared by the ``canary`` step (flows), ``slipway rollback``/``reconcile`` (CLI) and the
compliance ``demote`` action (governance), all of which may import serve. The step that runs a canary inside a
pipeline is :mod:`slipway.flows.steps.canary`; the plan is :mod:`slipway.policies.canaryplan`.
"""

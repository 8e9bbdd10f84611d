"""Step types, one module per family (``generic``, ``data``, ``finetune``, ...).

Every module here is imported by :func:`slipway.flows.steptypes.discover`; register step types with
``@step_type(...)`` from :mod:`slipway.flows.steptypes` and import heavy libraries inside functions.
Modules starting with ``_`` are helpers of one step module (``_datacheck`` of ``data``, ``_drift`` of
``nightly_eval``).
"""

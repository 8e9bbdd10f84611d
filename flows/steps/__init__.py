"""Step types, one module per family (``generic``, ``data``, ``finetune``, ...).

Every module here is imported by :func:`slipway.policies.discovery.load_plugins`; register step types with
``@step_type(...)`` from :mod:`slipway.flows.steptypes` and import heavy libraries inside functions.
"""

"""Governance: what serving cost (``costreport``), whether the installation keeps its rules (``compliance``,
``checks``) and how long it keeps data (``retention``). Run on a schedule by the ``cost_report`` and
``compliance_check`` steps and by ``slipway cost`` / ``slipway compliance``; it reads the registry and may ask
serving to act (a compliance ``demote``), so it sits between flows and serve.
"""

"""The root of every error the governance pillar (cost reports, compliance, retention) raises."""

from __future__ import annotations

from slipway.errors import SlipwayError


class GovernanceError(SlipwayError):
    """Root of the governance pillar's errors."""

"""Canary rollouts: the controller that walks a CanaryPlan, analyses windows, promotes or rolls back."""

"""slipway: declarative LLM promotion pipelines on Prefect and Ray Serve, recorded in a SQL model registry."""

__version__ = "0.1.0"

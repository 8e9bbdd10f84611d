"""Upstreams that are not weights served here: hosted providers behind the gateway (the ``Provider`` kind)."""

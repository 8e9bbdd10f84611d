from slipway.cli import entrypoint

entrypoint()

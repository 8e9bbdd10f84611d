#!/usr/bin/env bash
# Kubernetes auth for slipway's pods (Prefect worker jobs, Ray head and workers): the service account
# `slipway` in namespace `slipway` gets the `slipway` policy, with short-lived tokens.
set -euo pipefail
vault auth enable -path=kubernetes kubernetes 2>/dev/null || true
vault write auth/kubernetes/role/slipway \
  bound_service_account_names=slipway \
  bound_service_account_namespaces=slipway \
  token_policies=slipway \
  token_ttl=1h token_max_ttl=4h
vault secrets enable -path=transit transit 2>/dev/null || true
vault write -f transit/keys/slipway-prompts type=aes256-gcm96

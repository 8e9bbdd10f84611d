# Vault policy for slipway: exactly the paths slipway reads (KV v2 secrets it resolves from vault:// references,
# and the transit key that encrypts prompt/response logs). Attach it to the Kubernetes auth role below.
#
#   vault policy write slipway infra/vault/slipway.hcl

# KV v2 data and metadata of slipway's secrets: vault://secret/slipway/<name>#<key>
path "secret/data/slipway/*" {
  capabilities = ["read"]
}

path "secret/metadata/slipway/*" {
  capabilities = ["read", "list"]
}

# Prompt/response log encryption: encrypt and decrypt with one named key, never export or rotate it.
path "transit/encrypt/slipway-prompts" {
  capabilities = ["update"]
}

path "transit/decrypt/slipway-prompts" {
  capabilities = ["update"]
}

# Leases of dynamic secrets (e.g. database credentials) are renewed by slipway while it runs.
path "sys/leases/renew" {
  capabilities = ["update"]
}

# Token self-inspection and renewal (hvac checks its token before use).
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

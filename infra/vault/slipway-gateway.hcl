# The gateway: short-lived registry credentials as a member of slipway_gateway (read API keys, write usage rows;
# nothing else). infra/vault/database.sh.
path "database/creds/slipway-gateway" {
  capabilities = ["read"]
}

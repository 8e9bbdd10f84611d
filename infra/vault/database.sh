#!/usr/bin/env bash
# Short-lived PostgreSQL credentials for slipway's services, from Vault's (or OpenBao's) database secrets engine.
#
# Each lease creates a login role that is a member of `slipway_worker` or `slipway_gateway` (created, with exactly
# their privileges, by `slipway db roles`) and expires with the lease: nothing long-lived sits in a Kubernetes
# secret, and the registry's audit log names the lease's role (`slipway-worker-<time>-<random>`), which Vault's own
# audit log ties to the pod that asked.
#
#   REGISTRY_HOST=slipway-postgres.slipway:5432 REGISTRY_DB=slipway VAULT_DB_USER=vault VAULT_DB_PASSWORD=... \
#     bash infra/vault/database.sh
#
# VAULT_DB_USER needs CREATEROLE and membership WITH ADMIN OPTION of slipway_worker and slipway_gateway (the owner
# of the registry can grant that: GRANT slipway_worker, slipway_gateway TO vault WITH ADMIN OPTION). Pods read
# their credentials with the policies slipway-worker.hcl / slipway-gateway.hcl (bound by kubernetes-role.sh).
set -euo pipefail
: "${REGISTRY_HOST:?host:port of the registry database}" "${REGISTRY_DB:?its database name}"
: "${VAULT_DB_USER:?the role Vault logs in as}" "${VAULT_DB_PASSWORD:?its password}"
MOUNT="${DATABASE_MOUNT:-database}"
vault secrets enable -path="$MOUNT" database 2>/dev/null || true
vault write "$MOUNT/config/slipway-registry" \
  plugin_name=postgresql-database-plugin \
  connection_url="postgresql://{{username}}:{{password}}@${REGISTRY_HOST}/${REGISTRY_DB}?sslmode=${REGISTRY_SSLMODE:-require}" \
  username="$VAULT_DB_USER" password="$VAULT_DB_PASSWORD" \
  username_template='{{ .RoleName }}-{{ unix_time }}-{{ random 6 | lowercase }}' \
  allowed_roles=slipway-worker,slipway-gateway
for service in worker gateway; do
  vault write "$MOUNT/roles/slipway-$service" \
    db_name=slipway-registry default_ttl=1h max_ttl=24h \
    creation_statements="CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' IN ROLE slipway_$service;" \
    revocation_statements="REVOKE slipway_$service FROM \"{{name}}\"; DROP ROLE IF EXISTS \"{{name}}\";"
  vault policy write "slipway-$service" "$(dirname "$0")/slipway-$service.hcl"
done

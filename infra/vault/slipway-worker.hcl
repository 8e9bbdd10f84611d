# Prefect workers and scheduled jobs: short-lived registry credentials as a member of slipway_worker
# (= slipway_operator: run pipelines, register versions, move unprotected aliases). infra/vault/database.sh.
path "database/creds/slipway-worker" {
  capabilities = ["read"]
}

#!/usr/bin/env bash
# Start the MLflow tracking server on 127.0.0.1 with the SQLite backend of this working directory.
#   MLFLOW_PORT                   port (default 5000)
#   MLFLOW_BACKEND_STORE_URI      backend store (default sqlite:///.blendsign/mlflow.db)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts go: a local folder (default .blendsign/mlartifacts) or s3://bucket/prefix
#                                 (then AWS_* / MLFLOW_S3_ENDPOINT_URL from the environment are used; never printed)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .blendsign
BIN=${BIN:-.venv/bin}
PORT=${MLFLOW_PORT:-5000}
BACKEND=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$(pwd)/.blendsign/mlflow.db}
ARTIFACTS=${MLFLOW_ARTIFACTS_DESTINATION:-$(pwd)/.blendsign/mlartifacts}
echo "MLflow server: http://127.0.0.1:${PORT} (backend ${BACKEND%%\?*}, artifacts ${ARTIFACTS})"
exec "$BIN/mlflow" server --host 127.0.0.1 --port "$PORT" \
  --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts

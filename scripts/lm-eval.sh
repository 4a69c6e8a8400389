#!/usr/bin/env bash
# lm-evaluation-harness through splitserve (its local-completions model on /v1/completions) against
# its own transformers backend, both float32, on the local tasks of scripts/lm-eval/ (docs/api.md).
#
#   scripts/lm-eval.sh OUT                    # disaggregated 1 + 1, float32
#   UP_FLAGS="--mode colocated" scripts/lm-eval.sh OUT
set -euo pipefail
out=${1:?usage: scripts/lm-eval.sh OUT}
py=${PYTHON:-.venv/bin/python}
port=${PORT:-8400}
mkdir -p "$out"
"$py" -c "import lm_eval, tenacity" 2> /dev/null || "$py" -m pip install -q -e '.[eval]'
# shellcheck disable=SC2086  # UP_FLAGS are words
"$py" -m splitserve.cli up --dtype float32 --http-port "$port" --grpc-port $((port + 1)) \
  --scheduler-port $((port + 2)) --log-dir "$out/logs" ${UP_FLAGS:-} > "$out/up.txt" 2>&1 &
up=$!
trap 'kill -TERM "$up" 2> /dev/null; wait "$up" || true' EXIT
until grep -qs "splitserve is ready" "$out/up.txt"; do
  kill -0 "$up" 2> /dev/null || { cat "$out/up.txt"; exit 1; }
  sleep 0.5
done
"$py" scripts/lm-eval/compare.py --url "http://127.0.0.1:$port" --output "$out/lm-eval.json" 2>&1 \
  | tee "$out/lm-eval.txt"

#!/usr/bin/env bash
# Fresh machine -> the daemon serving the default model, and a real inferlet run end to end
# through the WebSocket protocol. Stops the daemon when the inferlet has finished.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
.venv/bin/pie model add smollm2-135m-instruct
.venv/bin/pie sandbox build
port=${PIE_DEMO_PORT:-8080}
log=$(mktemp -t pie-demo.XXXXXX.log)
.venv/bin/pie serve --no-auth --port "tcp:$port:interface=127.0.0.1" >"$log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
echo "[demo] daemon pid $daemon, log $log; waiting for it to listen on $port"
for _ in $(seq 300); do  # the model loads before the daemon listens
  .venv/bin/pie query --url "ws://127.0.0.1:$port" model_status 2>/dev/null && break
  kill -0 $daemon 2>/dev/null || { echo "[demo] the daemon exited:"; tail -20 "$log"; exit 1; }
  sleep 1
done
.venv/bin/pie run --url "ws://127.0.0.1:$port" inferlets/text_completion.py -- \
  --prompt "${1:-What is the capital of France?}" --max-tokens 48

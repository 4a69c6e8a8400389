# Sourced by the benchmark scripts: start a fresh `splitserve up`, sweep it with `splitserve bench
# serve`, stop it. Needs $out, $py and $port set.
#
#   serve_bench LABEL "BENCH SERVE FLAGS" UP-FLAGS...
serve_bench() {
  local label=$1 bench=$2
  shift 2
  "$py" -m splitserve.cli up --http-port "$port" --grpc-port $((port + 1)) --scheduler-port $((port + 2)) \
    --log-dir "$out/logs-$label" "$@" > "$out/up-$label.txt" 2>&1 &
  local up=$!
  until grep -qs "splitserve is ready" "$out/up-$label.txt"; do
    kill -0 "$up" 2> /dev/null || { cat "$out/up-$label.txt"; exit 1; }
    sleep 0.5
  done
  # shellcheck disable=SC2086  # the bench flags are words
  "$py" -m splitserve.cli bench serve --url "http://127.0.0.1:$port" $bench --label "$label" \
    --output "$out/$label.json" | tee "$out/bench-$label.txt"
  kill -TERM "$up"
  wait "$up" || true
}

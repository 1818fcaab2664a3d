#!/usr/bin/env bash
# /segment latency of two bundles on default settings (engine auto), one server at a time, same machine.
# usage: bash latency.sh OLD_BUNDLE NEW_BUNDLE OUT_DIR
set -euo pipefail
old=$1 new=$2 out=$3 port=8031
mkdir -p "$out"
# A token of our own, so the servers do not print a generated one into the logs kept in $out.
export ADMIN_TOKEN="${ADMIN_TOKEN:-$(python -c 'import secrets; print(secrets.token_urlsafe(24))')}"
for name in old new; do
  bundle=${!name}
  ultrarefiner serve --host 127.0.0.1 --port $port --model "$bundle" > "$out/serve_${name}.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/ready" > /dev/null && break; sleep 1; done
  python benchmarks/segment_latency.py --url "http://127.0.0.1:$port" --n 30 --warmup 2 > "$out/new_image_${name}.json"
  python benchmarks/segment_latency.py --url "http://127.0.0.1:$port" --n 30 --warmup 2 --repeat-image > "$out/repeat_${name}.json"
  kill $pid; wait $pid || true
done

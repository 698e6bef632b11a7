#!/usr/bin/env bash
# Print a Redis URL that answers PING: $STEERWATCH_TEST_REDIS_URL or 127.0.0.1:6379 when they answer,
# else a private redis-server started on a free loopback port (installing Debian's package if absent).
# Source-free: callers do  export STEERWATCH_TEST_REDIS_URL=$(scripts/ensure_redis.sh)
set -euo pipefail
ping_url() { timeout 3 .venv/bin/python - "$1" <<'PY' >/dev/null 2>&1
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
s = socket.create_connection((u.hostname, u.port or 6379), timeout=2)
s.sendall(b"PING\r\n"); assert s.recv(16).startswith(b"+PONG")
PY
}
for url in "${STEERWATCH_TEST_REDIS_URL:-}" "redis://127.0.0.1:6379/0"; do
  if [ -n "$url" ] && ping_url "$url"; then echo "$url"; exit 0; fi
done
if ! command -v redis-server >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >&2
fi
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$dir" \
  --logfile "$dir/redis.log" >&2
for _ in $(seq 50); do ping_url "redis://127.0.0.1:$port/0" && break; sleep 0.1; done
echo "redis://127.0.0.1:$port/0"

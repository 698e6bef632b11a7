#!/usr/bin/env bash
# Set up everything and run the whole test suite: lint, types, then pytest (slow tests included).
# Extra arguments go to pytest. Exit code 5 (no tests collected) is a failure, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
STEERWATCH_TEST_REDIS_URL="$(bash scripts/ensure_redis.sh)" || exit 1
export STEERWATCH_TEST_REDIS_URL
echo "redis for tests: $STEERWATCH_TEST_REDIS_URL"
bash scripts/ensure_test_tools.sh
.venv/bin/ruff check steering monitors service tests || exit 1
.venv/bin/mypy || exit 1
# The slow tests check the real default monitor pack: build it once (cached; a no-op afterwards).
.venv/bin/steerwatch prepare >/dev/null || exit 1
.venv/bin/steerwatch pack build >/dev/null || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"

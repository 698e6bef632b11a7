#!/usr/bin/env bash
# Install the Debian tools some tests drive, when missing: Chromium + ChromeDriver (the live alerts page,
# tests/deploy/test_alert_view_browser.py) and Prometheus with promtool (the alert rules' unit tests and
# the dashboard queries against a live Prometheus, tests/deploy/test_prometheus_live.py).
# Never fails the run: without root or apt, it says which tests will skip.
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "ensure_test_tools: installing ${need[*]} (Debian)" >&2
  # The prometheus package's service is never started here: the tests run their own on free ports.
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") \
    >/dev/null 2>&1 || echo "ensure_test_tools: apt-get install ${need[*]} failed; those tests will skip" >&2
else
  echo "ensure_test_tools: not root or no apt-get; missing ${need[*]}: their tests will skip" >&2
fi
exit 0

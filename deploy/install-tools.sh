#!/usr/bin/env bash
# Installs the system tools eddy's tests use, when missing: Java 17 + Maven (to fetch and run
# Apache Kafka) and Debian's prometheus (prometheus + promtool). Needs root or sudo; without
# either it says what is missing and the tests that need it skip.
set -euo pipefail
need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v promtool >/dev/null || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
  echo "install-tools: missing ${need[*]} and not root; the tests that need them will skip" >&2; exit 0
fi
echo "install-tools: installing ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian's package may start its own prometheus service; eddy's tests start their own.
pkill -x prometheus 2>/dev/null || true
pkill -f prometheus-node-exporter 2>/dev/null || true

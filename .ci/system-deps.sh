#!/usr/bin/env bash
# Installs the Debian packages the tests use for real: Slurm + munge (two-node cluster on this host) and
# Chromium (dashboard browser test). Idempotent. They are optional: without root, apt-get or a reachable
# package index (an offline GPU machine) it says so in one line and exits 0, and the tests that need them skip.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the Slurm and munge daemons live in sbin, outside a user's PATH
need=()
for tool in slurmctld slurmd sbatch srun scontrol sinfo; do
  command -v "$tool" >/dev/null || { need+=(slurm-wlm); break; }
done
command -v munged >/dev/null || need+=(munge)
command -v chromium >/dev/null || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
skip() {
  echo "system-deps: skipped ($1): ${need[*]} missing, their tests skip; as root: apt-get install -y --no-install-recommends ${need[*]}" >&2
  exit 0
}
[ "$(id -u)" = 0 ] || skip "not root"
command -v apt-get >/dev/null || skip "no apt-get"
export DEBIAN_FRONTEND=noninteractive
# Error-Mode=any: an unreachable index is a failure (apt-get update otherwise warns and exits 0).
timeout 120 apt-get update -qq -o APT::Update::Error-Mode=any >/dev/null 2>&1 || skip "package index unreachable"
timeout 600 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || skip "apt-get install failed"

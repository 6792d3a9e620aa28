#!/usr/bin/env bash
# Installs the Debian packages the tests use for real: Slurm + munge (two-node cluster on this host) and
# Chromium (dashboard browser test). Idempotent; needs root (apt-get).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the Slurm and munge daemons live in sbin, outside a user's PATH
need=()
for tool in slurmctld slurmd sbatch srun scontrol sinfo; do
  command -v "$tool" >/dev/null || { need+=(slurm-wlm); break; }
done
command -v munged >/dev/null || need+=(munge)
command -v chromium >/dev/null || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: missing ${need[*]}; install them as root: apt-get install -y --no-install-recommends ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

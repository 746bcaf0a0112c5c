#!/usr/bin/env bash
# A single-node Slurm for the tests, without systemd: Debian's slurmctld, slurmd,
# slurm-client and munge, configured under $NEXA_SLURM_DIR (default /tmp/nexa-slurm):
# one node with this machine's CPUs and two fake GPUs (gres on character devices made
# with mknod), one default partition, batch_sched_delay=0. Idempotent: a running one
# is reused. Prints the SLURM_CONF to export; `.ci/slurm.sh stop` stops it.
set -euo pipefail
dir="${NEXA_SLURM_DIR:-/tmp/nexa-slurm}"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export SLURM_CONF="$dir/slurm.conf"

if [ "${1:-}" = stop ]; then
  for d in slurmd slurmctld; do
    if [ -f "$dir/$d.pid" ]; then
      $SUDO kill "$(cat "$dir/$d.pid")" 2>/dev/null || true
      $SUDO rm -f "$dir/$d.pid"
    fi
  done
  exit 0
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1 \
    || ! command -v munged >/dev/null 2>&1; then
  pkgs="slurmctld slurmd slurm-client munge"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; }
fi

running() {
  [ -f "$dir/$1.pid" ] && grep -qv '^[^)]*) [ZX]' "/proc/$(cat "$dir/$1.pid")/stat" 2>/dev/null
}
$SUDO mkdir -p "$dir/state" "$dir/spool" "$dir/log"
host="$(hostname -s)"
cpus="$(nproc)"
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
conf="$(cat <<EOF
ClusterName=nexa-ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
SchedulerParameters=batch_sched_delay=0
MinJobAge=300
# A cancelled job is killed 1 s after its SIGTERM (a pilot scancelled mid-job dies then).
KillWait=1
ReturnToService=2
GresTypes=gpu
NodeName=$host CPUs=$cpus RealMemory=$mem_mb Gres=gpu:fake:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
)"
# A running one with this very configuration is reused (sinfo waits out its timeouts
# when no controller runs: it is asked only when one does); any other is restarted.
if running slurmctld && running slurmd && [ "$(cat "$SLURM_CONF" 2>/dev/null)" = "$conf" ] \
    && sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then
  echo "$SLURM_CONF"
  exit 0
fi
for d in slurmd slurmctld; do
  if running "$d"; then
    $SUDO kill "$(cat "$dir/$d.pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do running "$d" || break; sleep 0.1; done
  fi
done
for i in 0 1; do
  [ -e "$dir/fakegpu$i" ] || $SUDO mknod "$dir/fakegpu$i" c 1 3
done
printf '%s\n' "$conf" | $SUDO tee "$SLURM_CONF" >/dev/null
$SUDO tee "$dir/gres.conf" >/dev/null <<EOF
Name=gpu Type=fake File=$dir/fakegpu[0-1]
EOF

# munge: a key, and the daemon as its own user.
if [ ! -s /etc/munge/munge.key ]; then
  $SUDO sh -c 'dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null'
  $SUDO chown munge:munge /etc/munge/munge.key
  $SUDO chmod 400 /etc/munge/munge.key
fi
$SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
$SUDO chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
  $SUDO runuser -u munge -- munged
fi

$SUDO env SLURM_CONF="$SLURM_CONF" slurmctld -i
$SUDO env SLURM_CONF="$SLURM_CONF" slurmd
for _ in $(seq 1 100); do
  if sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then
    echo "$SLURM_CONF"
    exit 0
  fi
  sleep 0.1
done
echo "slurm did not come up; its logs:" >&2
tail -n 20 "$dir"/log/*.log >&2 || true
exit 1

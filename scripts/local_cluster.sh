#!/usr/bin/env bash
# A two-node cluster on one machine, on loopback addresses only, to try the multi-node launchers
# (and for the tests marked `cluster`). Needs root (namespaces, daemons) and Debian/Ubuntu.
#
#   sudo scripts/local_cluster.sh install     # apt-get install openssh-server pdsh slurm-wlm munge rsync
#   sudo scripts/local_cluster.sh start       # munged, slurmctld, and per node: sshd + slurmd
#   eval "$(scripts/local_cluster.sh env)"    # PATH (ssh wrapper), SLURM_CONF, GLOO_SOCKET_IFNAME
#   sinfo; python launch/multinode.py --hostfile "$SPARSE_FT_CLUSTER/hostfile" --master-addr 127.0.0.1 ...
#   sudo scripts/local_cluster.sh stop        # stops every daemon it started, by pid
#
# Nodes: node1 = 127.0.0.1 and node2 = 127.0.0.3; the controller ctl is on 127.0.0.1 too. Each node's
# sshd and slurmd run in their own mount and UTS namespace (`unshare -m -u`): the node's host name,
# an /etc/hosts naming the nodes, and its own disk at $STATE/local (a bind mount of
# $STATE/<node>/local), so `--node-local-checkpoints` really writes to different disks. Every daemon
# listens on its node's loopback address only (sshd: ListenAddress; SLURM: NoCtldInAddrAny and
# NoInAddrAny). node1 is 127.0.0.1 because of NoInAddrAny: srun in the batch step listens on its
# node's address but connects from 127.0.0.1 (the kernel's source address on lo), and slurmstepd
# connects back to that source address for the step's I/O. Nothing here talks to any other address.
# State (configs, keys, logs, pids) lives in $SPARSE_FT_CLUSTER (default /tmp/sparse-ft-cluster).
set -euo pipefail

STATE="${SPARSE_FT_CLUSTER:-/tmp/sparse-ft-cluster}"
NODES=(node1 node2)
declare -A ADDR=([ctl]=127.0.0.1 [node1]=127.0.0.1 [node2]=127.0.0.3)
declare -A SLURMD_PORT=([node1]=6818 [node2]=6819)
SSH_PORT=2222
CTLD_PORT=6817
PACKAGES=(openssh-server openssh-client pdsh slurm-wlm munge rsync)

die() { echo "local_cluster.sh: $*" >&2; exit 1; }
need_root() { [[ $(id -u) == 0 ]] || die "$1 needs root (namespaces and daemons); run it with sudo"; }

cmd_install() {
  need_root install
  command -v apt-get >/dev/null || die "install: apt-get not found; install ${PACKAGES[*]} with your package manager"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
}

missing_tools() {
  local t out=()
  for t in sshd ssh ssh-keygen rsync pdsh slurmctld slurmd munged sbatch srun sinfo unshare; do
    command -v "$t" >/dev/null 2>&1 || [[ -x /usr/sbin/$t ]] || out+=("$t")
  done
  echo "${out[*]:-}"
}

# Start "$@" in the background, in a new mount+UTS namespace named $node, and record its pid.
# The pid file holds the pid of the daemon itself (unshare execs the shell, which execs it).
spawn() {
  local name=$1 node=$2; shift 2
  local setup="hostname $node; mount --bind $STATE/hosts /etc/hosts"
  if [[ $node != ctl ]]; then
    mkdir -p "$STATE/$node/local"
    setup+="; mount --bind $STATE/$node/local $STATE/local"
  fi
  unshare -m -u --propagation private sh -c "$setup; exec \"\$@\"" sh "$@" \
    >>"$STATE/logs/$name.out" 2>&1 &
  echo $! >"$STATE/pids/$name"
}

write_configs() {
  mkdir -p "$STATE"/{pids,logs,bin,local,ctld,munge} "$STATE/home"
  printf '127.0.0.1 localhost ctl node1\n127.0.0.3 node2\n' >"$STATE/hosts"
  printf '127.0.0.1 slots=1\n127.0.0.3 slots=1\n' >"$STATE/hostfile"

  # sshd's privilege separation directory (the openssh-server service would create it).
  [[ -d /run/sshd ]] || { mkdir -p /run/sshd; chmod 755 /run/sshd; touch "$STATE/created-run-sshd"; }
  # ssh: one key for the client and the servers, a client config used through a PATH wrapper
  # (so DeepSpeed's and pdsh's plain `ssh HOST` use it without touching ~/.ssh).
  [[ -f $STATE/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/id_ed25519"
  [[ -f $STATE/host_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/host_ed25519"
  cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
  chmod 700 "$STATE"; chmod 600 "$STATE/authorized_keys"
  cat >"$STATE/ssh_config" <<EOF
Host 127.0.0.1 127.0.0.3 node1 node2
  Port $SSH_PORT
  IdentityFile $STATE/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $STATE/known_hosts
  StrictHostKeyChecking no
  LogLevel ERROR
EOF
  cat >"$STATE/bin/ssh" <<EOF
#!/bin/sh
exec /usr/bin/ssh -F $STATE/ssh_config "\$@"
EOF
  chmod +x "$STATE/bin/ssh"
  local node
  for node in "${NODES[@]}"; do
    cat >"$STATE/sshd_$node.conf" <<EOF
ListenAddress ${ADDR[$node]}:$SSH_PORT
HostKey $STATE/host_ed25519
PidFile $STATE/$node/sshd.pid
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitUserEnvironment no
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
EOF
  done

  # munge: a private key and socket.
  [[ -f $STATE/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of="$STATE/munge/munge.key" 2>/dev/null; }
  chmod 700 "$STATE/munge"; chmod 600 "$STATE/munge/munge.key"

  local cpus
  cpus=$(nproc)
  cat >"$STATE/slurm.conf" <<EOF
ClusterName=sparseft
SlurmctldHost=ctl(${ADDR[ctl]})
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.sock
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/ctld/slurmctld.pid
SlurmctldLogFile=$STATE/logs/slurmctld.log
SlurmdSpoolDir=$STATE/%n/spool
SlurmdPidFile=$STATE/%n/slurmd.pid
SlurmdLogFile=$STATE/%n/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
KillWait=5
MinJobAge=300
NodeName=node1 NodeAddr=${ADDR[node1]} NodeHostname=node1 Port=${SLURMD_PORT[node1]} CPUs=$cpus State=UNKNOWN
NodeName=node2 NodeAddr=${ADDR[node2]} NodeHostname=node2 Port=${SLURMD_PORT[node2]} CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for ((i = 0; i < t * 2; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  die "timed out waiting for $what (logs in $STATE/logs, $STATE/node*/)"
}

cmd_start() {
  need_root start
  local missing; missing=$(missing_tools)
  [[ -z $missing ]] || die "start: missing $missing; run: sudo $0 install"
  [[ ! -s $STATE/pids/slurmctld ]] || ! kill -0 "$(cat "$STATE/pids/slurmctld")" 2>/dev/null \
    || die "start: already running (pids in $STATE/pids); run '$0 stop' first"
  write_configs
  spawn munged ctl /usr/sbin/munged --foreground --force --socket="$STATE/munge/munge.sock" \
    --key-file="$STATE/munge/munge.key" --pid-file="$STATE/munge/munged.pid" \
    --log-file="$STATE/logs/munged.log" --seed-file="$STATE/munge/munged.seed"
  wait_for 20 munged test -S "$STATE/munge/munge.sock"
  local node
  for node in "${NODES[@]}"; do
    mkdir -p "$STATE/$node/spool"
    spawn "sshd-$node" "$node" /usr/sbin/sshd -D -e -f "$STATE/sshd_$node.conf"
  done
  export SLURM_CONF=$STATE/slurm.conf
  spawn slurmctld ctl /usr/sbin/slurmctld -D -c -f "$STATE/slurm.conf"  # -c: no jobs left from an earlier start
  wait_for 30 slurmctld scontrol ping
  for node in "${NODES[@]}"; do
    spawn "slurmd-$node" "$node" /usr/sbin/slurmd -D -N "$node" -f "$STATE/slurm.conf"
  done
  wait_for 60 "both slurmd idle" sh -c "[ \"\$(sinfo -h -N -o '%T' | grep -c idle)\" = 2 ]"
  for node in "${NODES[@]}"; do
    wait_for 20 "sshd on $node" "$STATE/bin/ssh" -o BatchMode=yes "${ADDR[$node]}" true
  done
  echo "local cluster up: nodes node1=${ADDR[node1]} node2=${ADDR[node2]}, controller ${ADDR[ctl]}, state in $STATE"
  echo "use it with: eval \"\$($0 env)\""
}

cmd_env() {
  cat <<EOF
export SPARSE_FT_CLUSTER=$STATE
export PATH=$STATE/bin:\$PATH
export SLURM_CONF=$STATE/slurm.conf
export GLOO_SOCKET_IFNAME=lo
EOF
}

cmd_stop() {
  local f pid name stopped=0
  [[ -d $STATE/pids ]] || { echo "local cluster: nothing to stop"; return 0; }
  # Compute nodes first, the controller and munged last.
  for name in slurmd-node1 slurmd-node2 sshd-node1 sshd-node2 slurmctld munged; do
    f=$STATE/pids/$name
    [[ -s $f ]] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for ((i = 0; i < 40; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
      stopped=$((stopped + 1))
    fi
    rm -f "$f"
  done
  if [[ -e $STATE/created-run-sshd ]]; then rmdir /run/sshd 2>/dev/null || true; rm -f "$STATE/created-run-sshd"; fi
  echo "local cluster: stopped $stopped daemons"
}

cmd_status() {
  local f name
  for f in "$STATE"/pids/*; do
    [[ -e $f ]] || continue
    name=$(basename "$f")
    if kill -0 "$(cat "$f")" 2>/dev/null; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: dead"; fi
  done
}

case "${1:-}" in
  install) cmd_install ;;
  start) trap 'rc=$?; [[ $rc == 0 ]] || { echo "start failed; stopping what started" >&2; cmd_stop; }' EXIT; cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  status) cmd_status ;;
  missing) missing_tools ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac

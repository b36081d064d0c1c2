#!/usr/bin/env bash
# A Ray cluster of several nodes on this one machine, to try the cluster path without a cloud, with Ray's
# token authentication on (every node shares one token, made once).
#
#   cluster/local-multinode.sh up       # a CPU head node, a gateway node and MOE_WORKER_NODES worker nodes
#   cluster/local-multinode.sh env      # the environment a client needs: `eval "$(cluster/local-multinode.sh env)"`
#   cluster/local-multinode.sh status   # `ray status` of that cluster
#   cluster/local-multinode.sh down     # stops the processes of the nodes `up` started, nothing else
#
# The head node (no GPUs) runs Serve and the moe controller. A gateway node declares one logical GPU and
# the `gateway` resource, like the gateway GPU nodes of cluster/aws.yaml and k8s/rayservice.yaml, for the
# gateway replica (`gateway_gpus: 1`, `gateway_resources: {gateway: 1}`). Each worker node declares
# MOE_GPUS_PER_NODE logical GPUs and as many units of the `expert_worker` resource, so expert workers
# (`worker_resources: {expert_worker: 1}`) land only there. Ray only counts logical GPUs: a gateway or an
# expert worker that finds no CUDA device computes on CPU.
#
# Settings (environment):
#   MOE_WORKER_NODES (2), MOE_GPUS_PER_NODE (2), MOE_HEAD_CPUS (4)
#   MOE_RAY_PORT (6379, the GCS), MOE_DASHBOARD_PORT (8265), MOE_CLIENT_PORT (10001, Ray client),
#   MOE_PORT_BASE (20000): node i (0 = head, 1 = gateway, 2.. = workers) takes the 100 ports from
#     MOE_PORT_BASE + 100 * i: its raylet, object manager, agents, metrics and its workers' ports
#   MOE_CLUSTER_DIR (~/.cache/moe-service/local-cluster): the token, the ports and what `down` stops
#   MOE_RAY_TEMP (/tmp/moe-ray-UID-PORT): Ray's temp dir for these nodes (short: Ray's sockets live there)
set -euo pipefail

NODES=${MOE_WORKER_NODES:-2}
GPUS=${MOE_GPUS_PER_NODE:-2}
HEAD_CPUS=${MOE_HEAD_CPUS:-4}
PORT=${MOE_RAY_PORT:-6379}
DASHBOARD_PORT=${MOE_DASHBOARD_PORT:-8265}
CLIENT_PORT=${MOE_CLIENT_PORT:-10001}
PORT_BASE=${MOE_PORT_BASE:-20000}
STATE=${MOE_CLUSTER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-service/local-cluster}
TEMP=${MOE_RAY_TEMP:-/tmp/moe-ray-$(id -u)-$PORT}
IP=127.0.0.1
ADDRESS="$IP:$PORT"
TOKEN="$STATE/auth_token"

client_env() {
    # what every node and every client of this cluster needs: the same token, token mode on
    echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN RAY_ADDRESS=$ADDRESS"
}

node_ports() {  # the per-node ports of node $1
    local b=$((PORT_BASE + 100 * $1))
    echo "--node-manager-port $b --object-manager-port $((b + 1)) --dashboard-agent-listen-port $((b + 2))" \
         "--dashboard-agent-grpc-port $((b + 3)) --metrics-export-port $((b + 4)) --runtime-env-agent-port $((b + 5))" \
         "--min-worker-port $((b + 10)) --max-worker-port $((b + 99))"
}

up() {
    if [ -f "$STATE/temp_dir" ] && [ -n "$(ours "$(cat "$STATE/temp_dir")")" ]; then
        echo "a cluster from $STATE is already running; '$0 down' first" >&2
        exit 1
    fi
    mkdir -p "$STATE"
    if [ ! -s "$TOKEN" ]; then  # one token for every node, made once and kept (mode 600)
        (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN")
    fi
    echo "$TEMP" >"$STATE/temp_dir"
    eval "$(client_env)"
    # shellcheck disable=SC2046  # node_ports is a list of flags
    ray start --head --node-ip-address "$IP" --port "$PORT" --temp-dir "$TEMP" \
        --dashboard-host "$IP" --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port "$CLIENT_PORT" \
        --num-cpus "$HEAD_CPUS" --num-gpus 0 $(node_ports 0) --disable-usage-stats
    # shellcheck disable=SC2046
    ray start --address "$ADDRESS" --node-ip-address "$IP" \
        --num-cpus 1 --num-gpus 1 --resources '{"gateway": 1}' $(node_ports 1) --disable-usage-stats
    for i in $(seq 1 "$NODES"); do
        # shellcheck disable=SC2046
        ray start --address "$ADDRESS" --node-ip-address "$IP" \
            --num-cpus 1 --num-gpus "$GPUS" --resources "{\"expert_worker\": $GPUS}" $(node_ports $((i + 1))) \
            --disable-usage-stats
    done
    ours "$TEMP" >"$STATE/pids"
    cat <<EOF

Ray cluster at $ADDRESS with token authentication: 1 head node, 1 gateway node (1 logical GPU), and
$NODES worker node(s) with $GPUS logical GPU(s) and $GPUS expert_worker each. Its token: $TOKEN

Clients need the same token:  eval "\$($0 env)"
Deploy:    serve deploy cluster/serve-config.yaml --address http://$IP:$DASHBOARD_PORT
     or:   moe-service serve --ray-address $ADDRESS --workers $((NODES * GPUS)) --gpus-per-worker 1 --gateway-gpus 1
gRPC:      127.0.0.1:9000   (moe-service generate --address 127.0.0.1:9000 "hello")
Dashboard: http://$IP:$DASHBOARD_PORT (asks for the token)
Stop:      $0 down
EOF
}

ours() {
    # the cluster's processes: those that name its temp dir (Ray's C++ node processes and its session
    # paths; `up` recorded the first of them) and everything they started (agents and workers, which
    # rename themselves ray::...); a pid is listed once, parents first
    python3 - "$1" "$STATE/pids" <<'PY'
import os, sys
temp, recorded = sys.argv[1], sys.argv[2]
parent, roots = {}, set()
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        with open(f"/proc/{d}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        if state == "Z":  # exited already
            continue
        parent[int(d)] = int(ppid)
        with open(f"/proc/{d}/cmdline", "rb") as f:
            if temp.encode() in f.read():
                roots.add(int(d))
    except OSError:
        continue
if os.path.exists(recorded):
    roots |= {int(p) for p in open(recorded).read().split() if int(p) in parent}
found, changed = set(roots), True
while changed:
    children = {p for p, pp in parent.items() if pp in found} - found
    changed = bool(children)
    found |= children
found.discard(os.getpid())
print(" ".join(map(str, sorted(found))))
PY
}

down() {
    # only the processes of this cluster's nodes (by what `up` recorded), not every Ray of this user as
    # `ray stop` would
    [ -f "$STATE/temp_dir" ] || { echo "no cluster recorded in $STATE" >&2; exit 0; }
    local temp pids
    temp=$(cat "$STATE/temp_dir")
    pids=$(ours "$temp")
    [ -z "$pids" ] || kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 50); do
        [ -z "$pids" ] && break
        # still running (a zombie has exited: only its parent can still reap it)
        pids=$(ps -o pid=,stat= -p "$(echo $pids | tr ' ' ,)" 2>/dev/null | awk '$2 !~ /^Z/ {print $1}' || true)
        sleep 0.2  # waiting for the processes to exit
    done
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    rm -f "$STATE/temp_dir" "$STATE/pids"
    rm -rf "$temp"
    echo "stopped the local cluster of $STATE (its token stays in $TOKEN)"
}

case "${1:-}" in
    up) up ;;
    env) client_env ;;
    status) eval "$(client_env)" && ray status --address "$ADDRESS" ;;
    down) down ;;
    *)
        echo "usage: $0 up|env|status|down" >&2
        exit 2
        ;;
esac

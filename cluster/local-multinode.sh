#!/usr/bin/env bash
# A Ray cluster of several nodes on this one machine, to try the cluster path without a cloud.
#
#   cluster/local-multinode.sh up       # a CPU head node + MOE_WORKER_NODES worker nodes
#   cluster/local-multinode.sh status   # `ray status` of that cluster
#   cluster/local-multinode.sh down     # `ray stop`: stops EVERY Ray process of this user on this machine
#
# The head node (no GPUs) runs Serve and the moe controller. A gateway node declares one logical GPU and
# the `gateway` resource, like the gateway GPU nodes of cluster/aws.yaml and k8s/rayservice.yaml, for the
# gateway replica (`gateway_gpus: 1`, `gateway_resources: {gateway: 1}`). Each worker node declares
# MOE_GPUS_PER_NODE logical GPUs and as many units of the `expert_worker` resource, so expert workers
# (`worker_resources: {expert_worker: 1}`) land only there. Ray only counts logical GPUs: a gateway or an
# expert worker that finds no CUDA device computes on CPU.
#
# Then deploy with either
#   serve deploy cluster/serve-config.yaml
#   moe-service serve --ray-address auto --workers 4 --gpus-per-worker 1
#
# Settings (environment): MOE_WORKER_NODES (2), MOE_GPUS_PER_NODE (2), MOE_HEAD_CPUS (4),
# MOE_RAY_PORT (6379, the head's GCS port).
set -euo pipefail

NODES=${MOE_WORKER_NODES:-2}
GPUS=${MOE_GPUS_PER_NODE:-2}
HEAD_CPUS=${MOE_HEAD_CPUS:-4}
PORT=${MOE_RAY_PORT:-6379}
IP=127.0.0.1
ADDRESS="$IP:$PORT"

up() {
    # All nodes share this host's IP, so every per-node port that has a fixed default gets its own value:
    # the dashboard agent's HTTP port (default 52365), the metrics export port, and a disjoint range of
    # worker ports per node (by default every node would hand out ports from the same 10002-19999).
    ray start --head --node-ip-address "$IP" --port "$PORT" \
        --num-cpus "$HEAD_CPUS" --num-gpus 0 \
        --metrics-export-port 8080 \
        --min-worker-port 10002 --max-worker-port 10999 \
        --disable-usage-stats
    ray start --address "$ADDRESS" --node-ip-address "$IP" \
        --num-cpus 1 --num-gpus 1 --resources '{"gateway": 1}' \
        --dashboard-agent-listen-port 52465 \
        --metrics-export-port 8079 \
        --min-worker-port 20000 --max-worker-port 20999 \
        --disable-usage-stats
    for i in $(seq 1 "$NODES"); do
        ray start --address "$ADDRESS" --node-ip-address "$IP" \
            --num-cpus 1 --num-gpus "$GPUS" --resources "{\"expert_worker\": $GPUS}" \
            --dashboard-agent-listen-port $((52365 + i)) \
            --metrics-export-port $((8080 + i)) \
            --min-worker-port $((10000 + 1000 * i)) --max-worker-port $((10999 + 1000 * i)) \
            --disable-usage-stats
    done
    cat <<EOF

Ray cluster at $ADDRESS: 1 head node, 1 gateway node (1 logical GPU) + $NODES worker node(s) with $GPUS
logical GPU(s) and $GPUS expert_worker each.
Deploy:    serve deploy cluster/serve-config.yaml
     or:   moe-service serve --ray-address auto --workers $((NODES * GPUS)) --gpus-per-worker 1
gRPC:      127.0.0.1:9000   (moe-service generate --address 127.0.0.1:9000 "hello")
Dashboard: http://127.0.0.1:8265
Stop:      $0 down
EOF
}

case "${1:-}" in
    up) up ;;
    status) ray status --address "$ADDRESS" ;;
    down) ray stop ;;
    *)
        echo "usage: $0 up|status|down" >&2
        exit 2
        ;;
esac

#!/usr/bin/env bash
# Launch megatron_pept with torchrun on one node or several (c10d rendezvous).
#
#   One node, 8 GPUs:
#     NPROC_PER_NODE=8 launch/torchrun.sh --config configs/relora_350m.yaml parallel.backend=fsdp2
#   Two nodes: run on every node with the same RDZV_ENDPOINT (host:port of the first node) and NNODES:
#     NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29400 launch/torchrun.sh --config FILE parallel.backend=fsdp2
#
# Environment: NNODES (default 1), NPROC_PER_NODE (default: GPUs visible, or 1), RDZV_ENDPOINT, RDZV_ID,
# PYTHON (default python). Arguments go to megatron_pept.train.
#   One node without RDZV_ENDPOINT/RDZV_ID: a free port and a rendezvous id of its own (127.0.0.1:0, a uuid), so
#   several jobs can run on one host at once. Several nodes: RDZV_ENDPOINT (default 127.0.0.1:29400: all "nodes"
#   on this host) and RDZV_ID (default megatron_pept) must be the same on every node.
#
# Pre-emption: SIGTERM or SIGUSR1 sent to this process (torchrun, run by `python -m megatron_pept.signals`) is
# passed on to the workers, which save a checkpoint at the end of the step and exit 0; so does this process. Run
# the same command again to resume (checkpoint.resume=auto). SIGINT (Ctrl-C) stops everything at once.
set -euo pipefail
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
if ! [[ ${NNODES} =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
  echo "torchrun.sh: error: NNODES must be a node count such as 2 (or MIN:MAX), got '${NNODES}'" >&2
  exit 2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(${PYTHON} -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
if [[ ${NNODES} == 1 || ${NNODES} == 1:1 ]]; then
  RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:0} # port 0: the agent's store takes a free port
  RDZV_ID=${RDZV_ID:-megatron_pept-$(cat /proc/sys/kernel/random/uuid 2>/dev/null || echo "$$-${RANDOM}")}
else
  RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29400}
  RDZV_ID=${RDZV_ID:-megatron_pept}
fi
exec ${PYTHON} -m megatron_pept.signals torchrun \
  --nnodes "${NNODES}" --nproc_per_node "${NPROC_PER_NODE}" \
  --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT}" --rdzv_id "${RDZV_ID}" \
  -m megatron_pept.train "$@"

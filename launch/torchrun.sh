#!/usr/bin/env bash
# Launch megatron_pept with torchrun on one node or several (c10d rendezvous).
#
#   One node, 8 GPUs:
#     NPROC_PER_NODE=8 launch/torchrun.sh --config configs/relora_350m.yaml parallel.backend=fsdp2
#   Two nodes: run on every node with the same RDZV_ENDPOINT (host:port of the first node) and NNODES:
#     NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29400 launch/torchrun.sh --config FILE parallel.backend=fsdp2
#
# Environment: NNODES (default 1), NPROC_PER_NODE (default: GPUs visible, or 1), RDZV_ENDPOINT (default
# 127.0.0.1:29400), RDZV_ID (default megatron_pept), PYTHON (default python). Arguments go to megatron_pept.train.
set -euo pipefail
NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(${PYTHON:-python} -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29400}
RDZV_ID=${RDZV_ID:-megatron_pept}
exec ${PYTHON:-python} -m torch.distributed.run \
  --nnodes "${NNODES}" --nproc_per_node "${NPROC_PER_NODE}" \
  --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT}" --rdzv_id "${RDZV_ID}" \
  -m megatron_pept.train "$@"

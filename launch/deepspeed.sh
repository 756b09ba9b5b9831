#!/usr/bin/env bash
# Launch megatron_pept with the deepspeed launcher (parallel.backend=deepspeed, parallel.zero_stage=1|2|3).
#
#   One node:       NUM_GPUS=8 launch/deepspeed.sh --config FILE parallel.backend=deepspeed parallel.zero_stage=2
#   Several nodes (ssh from the first node to the others listed in the hostfile):
#                   HOSTFILE=hosts launch/deepspeed.sh --config FILE parallel.backend=deepspeed
#   Several nodes without ssh (run on every node; NODE_RANK 0..N-1, MASTER_ADDR = first node):
#                   HOSTFILE=hosts NO_SSH=1 NODE_RANK=1 MASTER_ADDR=node0 launch/deepspeed.sh --config FILE ...
#
# A hostfile lists one node per line: "node0 slots=8". Environment: NUM_GPUS (single node), HOSTFILE, NO_SSH,
# NODE_RANK, MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default 29500), PYTHON (default python).
set -euo pipefail
PYTHON=${PYTHON:-python}
ARGS=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  ARGS+=(--hostfile "${HOSTFILE}")
  if [[ -n "${NO_SSH:-}" ]]; then
    ARGS+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK with NO_SSH}")
  fi
else
  ARGS+=(--num_gpus "${NUM_GPUS:-$(${PYTHON} -c "import torch; print(max(1, torch.cuda.device_count()))")}")
fi
exec "$(dirname "$(command -v "${PYTHON}")")/deepspeed" "${ARGS[@]}" --module megatron_pept.train "$@"

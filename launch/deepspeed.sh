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
# NODE_RANK, MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default: a free port on one node, 29500 with a hostfile),
# PYTHON (default python).
#
# Pre-emption: SIGTERM or SIGUSR1 sent to this process (deepspeed's runner, run by `python -m megatron_pept.signals`)
# is passed on to the workers of this node, which save a checkpoint at the end of the step and exit 0; so does this
# process (deepspeed's runner on its own dies of either signal and leaves its workers running). With NO_SSH, signal
# any node's launcher: the ranks agree at the end of the step and all save. With a hostfile and ssh (pdsh) the
# workers are not below this process and the runner keeps its own SIGTERM handling (every node killed at once).
set -euo pipefail
PYTHON=${PYTHON:-python}
if [[ -z "${HOSTFILE:-}" && -z "${MASTER_PORT:-}" ]]; then # one node: a port nobody listens on now
  MASTER_PORT=$(${PYTHON} -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
fi
ARGS=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  ARGS+=(--hostfile "${HOSTFILE}")
  if [[ -n "${NO_SSH:-}" ]]; then
    ARGS+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK with NO_SSH}")
  fi
else
  ARGS+=(--num_gpus "${NUM_GPUS:-$(${PYTHON} -c "import torch; print(max(1, torch.cuda.device_count()))")}")
fi
exec ${PYTHON} -m megatron_pept.signals deepspeed "${ARGS[@]}" --module megatron_pept.train "$@"

#!/usr/bin/env bash
# Single node: one torchrun, one process per GPU.
#   bash examples/train_single_node.sh examples/solopo_llama3_8b_64k_h100.yaml [section.field=value ...]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [section.field=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}
export CUDA_DEVICE_MAX_CONNECTIONS=1            # TP/CP communication overlap needs it (pre-Blackwell)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TORCH_NCCL_AVOID_RECORD_STREAMS=1

DISTRIBUTED_ARGS=(--nproc-per-node "$GPUS_PER_NODE" --nnodes 1
                  --master-addr "${MASTER_ADDR:-localhost}" --master-port "${MASTER_PORT:-29500}")

# Reference log-probs once (skipped by the trainer's own check if the cache is already fresh).
if [[ "${PRECOMPUTE_REFERENCE:-1}" == "1" ]]; then
  torchrun "${DISTRIBUTED_ARGS[@]}" tools/precompute_reference.py --config "$CONFIG" "$@"
fi
torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_solopo.train --config "$CONFIG" "$@"

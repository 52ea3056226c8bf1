#!/usr/bin/env bash
# Single node: one torchrun, one process per GPU. Run from the repository root:
#   bash examples/train_single_node.sh examples/solopo_llama3_8b_64k_h100.yaml [section.field=value ...]
# GPUS_PER_NODE overrides the detected GPU count; PRECOMPUTE_REFERENCE=0 skips the reference step.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [section.field=value ...]}
shift

detect_gpus() {  # GPUs torch sees (honours CUDA_VISIBLE_DEVICES), else nvidia-smi's count, else 1
  local count
  count=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) || count=0
  if ! [[ "$count" =~ ^[0-9]+$ ]] || (( count < 1 )); then
    count=0
    if command -v nvidia-smi >/dev/null 2>&1; then
      count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || count=0
    fi
  fi
  (( count >= 1 )) || count=1
  echo "$count"
}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(detect_gpus)}
export CUDA_DEVICE_MAX_CONNECTIONS=1            # TP/CP communication overlap needs it (pre-Blackwell)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TORCH_NCCL_AVOID_RECORD_STREAMS=1

DISTRIBUTED_ARGS=(--nproc-per-node "$GPUS_PER_NODE" --nnodes 1
                  --master-addr "${MASTER_ADDR:-localhost}" --master-port "${MASTER_PORT:-29500}")

# Reference log-probs first. The tool keeps a cache that is already fresh (same reference
# checkpoint, dataset and roles) and says so, so a rerun skips the pass (run it with --force to
# recompute); a run without a precomputed reference (reference-free objective, reference.mode=live)
# prints "nothing to precompute" and goes on.
if [[ "${PRECOMPUTE_REFERENCE:-1}" == "1" ]]; then
  torchrun "${DISTRIBUTED_ARGS[@]}" tools/precompute_reference.py --config "$CONFIG" "$@"
fi
torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_solopo.train --config "$CONFIG" "$@"

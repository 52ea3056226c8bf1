"""``make demo``: the smallest end-to-end run, on CPU.

Builds a tiny Llama-style model under TP=2 on 2 gloo ranks (``torchrun``), packs a few random
preference groups in THD layout and prints per-sequence log-probs by role. (The trainer issue
replaces this with a short SoLoPO training.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch


def worker() -> None:
    from megatron.core import parallel_state

    from megatron_solopo.data.batch import PackedMicroBatch
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import ModelConfig, build_transformer_config
    from megatron_solopo.model.logprobs import forward_packed, masked_sequence_sums
    from megatron_solopo.parallel.distributed import destroy_distributed, initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.roles import Role

    torch.set_num_threads(1)
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    model_cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128,
                            num_attention_heads=4, num_query_groups=2, vocab_size=200)
    initialize_distributed(parallel, model=model_cfg)
    (model,) = build_model(model_cfg, build_transformer_config(model_cfg, parallel))
    gen = torch.Generator().manual_seed(0)
    roles = [Role.SHORT_CHOSEN, Role.SHORT_REJECTED, Role.LONG_CHOSEN]
    lengths = [24, 20, 96]
    tokens, cu = [], [0]
    for length in lengths:
        tokens.append(torch.randint(1, 200, (length,), generator=gen))
        cu.append(cu[-1] + length)
    ids = torch.cat(tokens)
    labels = torch.cat([torch.cat([t[1:], t.new_zeros(1)]) for t in tokens])
    response = torch.cat([torch.cat([torch.zeros(len(t) - 9), torch.ones(8), torch.zeros(1)])
                          for t in tokens])
    batch = PackedMicroBatch(
        tokens=ids, labels=labels, loss_mask=response, target_mask=(labels > 0).float(),
        position_ids=torch.cat([torch.arange(n) for n in lengths]),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        seq_lengths=torch.tensor(lengths, dtype=torch.int32),
        roles=torch.tensor([r.index for r in roles]), group_index=torch.zeros(3, dtype=torch.long),
        sample_indices=torch.zeros(1, dtype=torch.long), sample_ids=["demo-0"], max_seqlen=96)
    with torch.no_grad():
        logps = forward_packed(model, batch, model_cfg.vocab_size)
    sums = masked_sequence_sums(logps, batch.loss_mask, batch.cu_seqlens)
    if torch.distributed.get_rank() == 0:
        print(f"tiny Llama-style GPTModel, TP={parallel_state.get_tensor_model_parallel_world_size()}"
              f", one packed micro-batch of {batch.num_tokens} tokens")
        for role, value in zip(roles, sums.tolist()):
            print(f"  logp(response | {role.context} context) for {role.response}: {value:.4f}")
    destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", "29731", "-m", "megatron_solopo.demo", "--worker"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sys.exit(subprocess.call(command, env=env))


if __name__ == "__main__":
    main()

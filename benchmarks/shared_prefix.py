#!/usr/bin/env python
"""LongPO training step with and without shared-prefix packing (data.shared_prefix).

    python benchmarks/shared_prefix.py --compare                  # ratios 16, 64, 256
    python benchmarks/shared_prefix.py --compare --ratios 64 --answer 32 --steps 3

Each measurement runs in a fresh process (so peak memory is its own): a LongPO group (long
chosen + long rejected on one context of ``ratio * answer`` tokens, answers of ``answer``
tokens) packed with or without sharing, then forward + backward of the policy through
Megatron's schedule (the trainer's step minus the optimizer), on the CPU with the reference
attention by default, on a GPU when CUDA is present (``--backend flex``, or ``te`` with
Transformer Engine). It prints tokens per group, the median step time and the peak memory (RSS on
the CPU, the CUDA allocator's peak on a GPU), and with ``--compare`` the shared/unshared
ratios, all from one run.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(shared: bool, ratio: int, answer: int, steps: int, hidden: int, layers: int,
            backend: str) -> dict:
    import numpy as np
    import torch

    import megatron_solopo  # noqa: F401
    from megatron_solopo.data.dataset import PreferenceGroup
    from megatron_solopo.data.packing import pack_groups
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import ModelConfig, build_transformer_config
    from megatron_solopo.objectives import build_objective
    from megatron_solopo.objectives.base import ObjectiveInputs, RoleLogps
    from megatron_solopo.parallel.distributed import initialize_distributed, single_process_env
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.roles import Role
    from megatron_solopo.training.batches import group_role_values, logprob_positions
    from megatron_solopo.training.step import forward_backward

    torch.set_num_threads(2)
    vocab = 2048
    context = ratio * answer
    initialize_distributed(ParallelConfig(), single_process_env())
    model_cfg = ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=3 * hidden,
                            num_attention_heads=8, num_query_groups=2, vocab_size=vocab,
                            max_position_embeddings=2 * context + 4 * answer,
                            attention_backend=backend)
    (model,) = build_model(model_cfg, build_transformer_config(model_cfg, ParallelConfig()))
    gen = np.random.default_rng(0)
    prompt = gen.integers(3, vocab, context)

    def sequence(response):
        ids = np.concatenate([prompt, response])
        mask = np.zeros(len(ids), bool)
        mask[context:] = True
        return ids, mask

    group = PreferenceGroup(0, "bench", {
        Role.LONG_CHOSEN: [sequence(gen.integers(3, vocab, answer))],
        Role.LONG_REJECTED: [sequence(gen.integers(3, vocab, answer))]})
    roles = [Role.LONG_CHOSEN, Role.LONG_REJECTED]
    batch = pack_groups([group], roles, 2, 0, shared_prefix=shared)
    objective = build_objective("longpo", beta=0.1)
    whole = objective.sequence_logps_roles

    def loss_fn(batch, sums):
        policy = {role: RoleLogps(
            logps=group_role_values(sums.response_logps, batch, role),
            num_tokens=group_role_values(sums.response_tokens, batch, role),
            sequence_logps=group_role_values(sums.target_logps, batch, role),
            sequence_num_tokens=group_role_values(sums.target_tokens, batch, role)) for role in roles}
        reference = {role: torch.full((1,), -50.0) for role in objective.reference_roles}
        loss, _ = objective(ObjectiveInputs(policy=policy, reference=reference, num_groups=1.0))
        return loss, {"loss": loss.detach()}

    cuda = torch.cuda.is_available()
    times = []
    for _ in range(steps + 1):  # the first step warms up (and compiles flex on a GPU)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        forward_backward([model], [batch], loss_fn, vocab_size=vocab,
                         logprob_mask_fn=lambda b: logprob_positions(b, whole))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    # Peak memory: the GPU's allocator on CUDA, else the process's peak RSS.
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"shared": shared, "ratio": ratio, "context": context, "answer": answer,
            "tokens_per_group": batch.num_tokens, "step_s": statistics.median(times[1:]),
            "peak_mib": peak, "device": "cuda" if cuda else "cpu", "backend": backend}


def compare(args) -> list:
    rows = []
    for ratio in args.ratios:
        for shared in (False, True):
            command = [sys.executable, __file__, "--ratio", str(ratio), "--answer", str(args.answer),
                       "--steps", str(args.steps), "--hidden", str(args.hidden),
                       "--layers", str(args.layers), "--backend", args.backend]
            if shared:
                command.append("--shared")
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| long/answer | context | answer | tokens/group (off -> on) | step s (off -> on) | "
          "step on/off | peak MiB (off -> on) |")
    print("|---|---|---|---|---|---|---|")
    for off, on in zip(rows[0::2], rows[1::2]):
        print(f"| {off['ratio']} | {off['context']} | {off['answer']} | {off['tokens_per_group']} "
              f"-> {on['tokens_per_group']} | {off['step_s']:.3f} -> {on['step_s']:.3f} | "
              f"{on['step_s'] / off['step_s']:.2f}x | {off['peak_mib']:.0f} -> "
              f"{on['peak_mib']:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", action="store_true", help="run every ratio, off and on")
    parser.add_argument("--ratios", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--ratio", type=int, default=64, help="long context / answer length")
    parser.add_argument("--answer", type=int, default=32, help="answer tokens")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--backend", default="reference", choices=["reference", "flex", "te"])
    parser.add_argument("--shared", action="store_true")
    args = parser.parse_args()
    if args.compare:
        compare(args)
    else:
        print(json.dumps(measure(args.shared, args.ratio, args.answer, args.steps, args.hidden,
                                 args.layers, args.backend)))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Memory of the LM head + log-probs on one long sequence: Megatron's default (logits and fp32
cross entropy for every position) vs our LogprobHead (only the response positions, in chunks).

    python benchmarks/logprob_head_memory.py --mode full|response|targets --tokens 16384 --vocab 32000

Runs one forward + backward (``--forward-only``: a forward under no_grad, as evaluation and the
reference pass do) of a 1-layer model in a fresh process and prints peak RSS growth. ``targets``
is LogprobHead asked for every real target (what evaluation and the reference pass computed
before they used the response positions only). ``--compare`` runs every mode.
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(mode: str, tokens: int, vocab: int, hidden: int, response: int,
            forward_only: bool = False) -> dict:
    import torch

    import megatron_solopo  # noqa: F401
    from megatron_solopo.data.batch import PackedMicroBatch
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import ModelConfig, build_transformer_config
    from megatron_solopo.model.logprobs import forward_packed, packed_seq_params
    from megatron_solopo.parallel.distributed import initialize_distributed, single_process_env
    from megatron_solopo.parallel.layout import ParallelConfig

    torch.set_num_threads(2)
    initialize_distributed(ParallelConfig(), single_process_env())
    model_cfg = ModelConfig(num_layers=1, hidden_size=hidden, ffn_hidden_size=2 * hidden,
                            num_attention_heads=4, vocab_size=vocab, max_position_embeddings=tokens)
    (model,) = build_model(model_cfg, build_transformer_config(model_cfg, ParallelConfig()))
    ids = torch.randint(0, vocab, (tokens,))
    loss_mask = torch.zeros(tokens)
    loss_mask[-response - 1:-1] = 1
    batch = PackedMicroBatch(
        tokens=ids, labels=torch.cat([ids[1:], ids.new_zeros(1)]), loss_mask=loss_mask,
        target_mask=torch.cat([torch.ones(tokens - 1), torch.zeros(1)]),
        position_ids=torch.arange(tokens), cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32),
        seq_lengths=torch.tensor([tokens], dtype=torch.int32), roles=torch.zeros(1, dtype=torch.long),
        group_index=torch.zeros(1, dtype=torch.long), sample_indices=torch.zeros(1, dtype=torch.long),
        sample_ids=["bench"], max_seqlen=tokens)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    grad = torch.no_grad() if forward_only else torch.enable_grad()
    grad.__enter__()
    if mode == "full":  # GPTModel's own path: logits for all positions, vocab-parallel CE
        losses = model(input_ids=ids[None], position_ids=batch.position_ids[None],
                       attention_mask=None, labels=batch.labels[None],
                       packed_seq_params=packed_seq_params(batch))
        logp = -(losses[0] * loss_mask).sum()
    else:
        where = loss_mask.bool() if mode == "response" else batch.target_mask.bool()
        logp = (forward_packed(model, batch, vocab, logprob_mask=where) * loss_mask).sum()
    if not forward_only:
        logp.backward()
    grad.__exit__(None, None, None)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "forward_only": forward_only, "tokens": tokens, "vocab": vocab, "hidden": hidden,
            "response_tokens": response, "peak_rss_growth_mib": round((peak - before) / 1024, 1),
            "fwd_bwd_seconds": round(elapsed, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["full", "response", "targets"], default="response")
    parser.add_argument("--forward-only", action="store_true",
                        help="forward under no_grad (evaluation, reference pass)")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--compare", action="store_true", help="run every mode in fresh processes")
    args = parser.parse_args()
    if args.compare:
        for mode in ("full", "targets", "response"):
            subprocess.run([sys.executable, __file__, "--mode", mode, "--tokens", str(args.tokens),
                            "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                            "--response", str(args.response)]
                           + (["--forward-only"] if args.forward_only else []), check=True)
        return
    print(json.dumps(measure(args.mode, args.tokens, args.vocab, args.hidden, args.response,
                             args.forward_only)))


if __name__ == "__main__":
    main()

"""The LM head runs only where an objective reads a log-prob, in every pass: training, the live
reference and evaluation (and so reference precompute, which shares the reference pass). Full
``[T, V/TP]`` logits of a long context are never formed: each pass's head sees the response
positions only (plus the whole sequence for LongPO's NLL role), in chunks of at most
``training.logprob_chunk_size`` rows."""

import pytest

from tests.distributed.trainer_common import base_config, make_dataset, train
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed

CHUNK = 16


def _train_recording_head(raw: dict) -> dict:
    """Rank function: train (with evaluation and a live reference) while recording, for every
    model forward, the positions the head was asked for vs the batch's response/target
    positions, and the row count of every logits chunk."""
    from megatron_solopo.model import logprobs
    from megatron_solopo.training import step as step_module

    calls, chunk_rows = [], []
    forward_packed = step_module.forward_packed
    chunk_logprobs = logprobs.LogprobHead._chunk_logprobs

    def recording_forward(model, batch, vocab_size, *, logprob_mask=None, chunk_size=None):
        selected = batch.target_mask.bool() if logprob_mask is None else logprob_mask
        calls.append({"selected": int(selected.sum()), "response": int(batch.loss_mask.sum()),
                      "targets": int(batch.target_mask.sum()), "chunk": chunk_size})
        return forward_packed(model, batch, vocab_size, logprob_mask=logprob_mask,
                              chunk_size=chunk_size)

    def recording_chunk(self, hidden, targets, **kwargs):
        chunk_rows.append(int(hidden.shape[0]))
        return chunk_logprobs(self, hidden, targets, **kwargs)

    step_module.forward_packed = recording_forward
    logprobs.LogprobHead._chunk_logprobs = recording_chunk
    try:
        result = train(raw, capture=True)
    finally:
        step_module.forward_packed = forward_packed
        logprobs.LogprobHead._chunk_logprobs = chunk_logprobs
    return {"calls": calls, "chunk_rows": chunk_rows,
            "evaluated": any(row.get("eval") for row in result["history"])}


def test_head_only_on_response_positions_in_training_reference_and_evaluation(tmp_path):
    paths = make_dataset(tmp_path / "data", num_records=16)
    raw = base_config(paths, str(tmp_path), objective={"name": "long_dpo", "beta": 0.5},
                      reference={"mode": "live", "checkpoint": None},
                      training={"train_iters": 2, "eval_interval": 2, "eval_iters": 1,
                                "logprob_chunk_size": CHUNK})
    raw["data"]["valid_prefix"] = paths["valid"]
    (result,) = run_distributed(_train_recording_head, 1, raw)
    assert result["evaluated"]
    # Two steps (a live reference pass and the policy's each), then evaluation (the same).
    assert len(result["calls"]) >= 4
    for call in result["calls"]:
        assert call["targets"] > call["response"] > 0  # long contexts: far more targets
        assert call["selected"] == call["response"], call
        assert call["chunk"] == CHUNK
    assert result["chunk_rows"] and max(result["chunk_rows"]) <= CHUNK
    # Every head row is a selected position; training's chunks run twice (checkpointed: forward,
    # then recomputed in backward), the forward-only passes once.
    assert sum(result["chunk_rows"]) <= 2 * sum(call["selected"] for call in result["calls"])

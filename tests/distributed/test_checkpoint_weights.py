"""dist_checkpointing round trip of model weights across layouts (vocab padding included)."""

import pytest
import torch

from megatron_solopo.model.build import build_model
from megatron_solopo.model.config import build_transformer_config
from megatron_solopo.model.state import VOCAB_KEYS, gather_full_state_dict
from megatron_solopo.parallel.distributed import initialize_distributed
from megatron_solopo.parallel.layout import ParallelConfig
from megatron_solopo.training import checkpoint as ckpt
from tests.distributed.common import VOCAB, tiny_model
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


def _build(parallel, model_cfg, seed):
    initialize_distributed(parallel, seed=seed)
    tc = build_transformer_config(model_cfg, parallel)
    return build_model(model_cfg, tc)


def _save_then_load(save_fields, load_fields, root, **model_fields):
    model_cfg = tiny_model(**model_fields)
    save_parallel = ParallelConfig(**save_fields)
    chunks = _build(save_parallel, model_cfg, seed=3)
    saved = gather_full_state_dict(chunks)
    padded = model_cfg.padded_vocab_size(save_parallel.tensor_model_parallel_size)
    ckpt.save_checkpoint(root, 5, chunks, {"padded_vocab_size": padded}, common={"iteration": 5})
    load_parallel = ParallelConfig(**load_fields)
    chunks = _build(load_parallel, model_cfg, seed=99)  # different init: must be overwritten
    before = gather_full_state_dict(chunks)
    loaded = ckpt.load_checkpoint(root, chunks, padded_vocab_size=model_cfg.padded_vocab_size(
        load_parallel.tensor_model_parallel_size))
    after = gather_full_state_dict(chunks)
    assert loaded.iteration == 5 and loaded.common["iteration"] == 5
    for key, value in saved.items():
        rows = VOCAB if key in VOCAB_KEYS else None
        if "norm" not in key:  # norms initialize to ones whatever the seed
            assert not torch.equal(before[key][:rows], value[:rows]), key
        assert torch.equal(after[key][:rows], value[:rows]), key
    return True


@pytest.mark.parametrize("save_fields,load_fields", [
    (dict(tensor_model_parallel_size=2), dict()),
    (dict(), dict(tensor_model_parallel_size=2)),
    (dict(pipeline_model_parallel_size=2), dict(tensor_model_parallel_size=2,
                                                sequence_parallel=True)),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
     dict(pipeline_model_parallel_size=2)),
])
def test_weights_reshard_across_layouts(tmp_path, save_fields, load_fields):
    run_distributed(_save_then_load, 2, save_fields, load_fields, str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / ckpt.TRACKER_FILE).read_text().strip() == "5"
    assert (tmp_path / "ckpt" / "iter_0000005" / ckpt.RUN_CONFIG_FILE).exists()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_vocab_padding_changes_with_pipeline_stages(tmp_path, tied):
    """Saved at TP=2 (vocab padded for TP=2), loaded at PP=2: the vocab rows are whole-tensor
    requests, made on the first stage (embedding) and the last (output layer)."""
    run_distributed(_save_then_load, 2, dict(tensor_model_parallel_size=2),
                    dict(pipeline_model_parallel_size=2), str(tmp_path / "ckpt"),
                    untie_embeddings_and_output_weights=not tied)

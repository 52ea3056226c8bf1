"""Set-up refusals for GPU features (model/setup_checks.py, docs/gpu.md): each would otherwise
crash or silently corrupt the first step on a GPU cluster. Checked here without a GPU by handing
the checks the versions and availability a GPU machine would report."""

import pytest
import torch

from megatron_solopo.model import build, setup_checks
from megatron_solopo.model.config import ModelConfig, PrecisionConfig, build_transformer_config
from megatron_solopo.parallel.layout import ParallelConfig

MODEL = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                    num_query_groups=4, vocab_size=100)


@pytest.fixture
def te_and_cuda(monkeypatch):
    """What a GPU machine with Transformer Engine reports."""
    monkeypatch.setattr(build, "te_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_te_attention_needs_bf16_and_auto_takes_the_reference_path_in_fp32(te_and_cuda):
    with pytest.raises(ValueError, match=r"attention_backend='te' needs precision.bf16=true"):
        build.resolve_attention_backend("te", bf16=False)
    assert build.resolve_attention_backend("te", bf16=True) == "te"
    assert build.resolve_attention_backend("auto", bf16=False) == "reference"
    assert build.resolve_attention_backend("auto", bf16=True) == "te"


@pytest.mark.parametrize("kind,version,refused", [
    ("p2p", (2, 7), None),
    ("all_gather", (2, 17), r"cp_comm_type='all_gather'.*needs Transformer Engine >= 2.18"),
    ("all_gather", (2, 18), None),
    ("a2a", (2, 9), r"cp_comm_type='a2a'.*needs Transformer Engine >= 2.10"),
    ("a2a", (2, 10), None),
    ("a2a+p2p", (2, 18), r"cp_comm_type='a2a\+p2p' needs hierarchical"),
])
def test_context_parallel_communication_per_te_version(kind, version, refused):
    parallel = ParallelConfig(context_parallel_size=2, cp_comm_type=kind)
    if refused is None:
        setup_checks.check_te_context_parallel(parallel, MODEL, version)
    else:
        with pytest.raises(ValueError, match=refused):
            setup_checks.check_te_context_parallel(parallel, MODEL, version)
    # Without CP, TE's CP attention is not used: nothing to refuse.
    setup_checks.check_te_context_parallel(ParallelConfig(cp_comm_type=kind), MODEL, (2, 0))


def test_a2a_needs_each_tp_ranks_heads_divisible_by_cp():
    # TP=2: 4 query heads and 2 KV heads per TP rank; CP=4 cannot split 2 KV heads.
    parallel = ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=4,
                              cp_comm_type="a2a")
    with pytest.raises(ValueError, match=r"4 query head\(s\) and 2 key/value head\(s\)"):
        setup_checks.check_te_context_parallel(parallel, MODEL, (2, 18))
    setup_checks.check_te_context_parallel(
        ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2, cp_comm_type="a2a"),
        MODEL, (2, 18))


def test_te_set_up_is_checked_when_the_transformer_config_is_built():
    with pytest.raises(ValueError, match=r"a2a\+p2p"):
        build_transformer_config(MODEL, ParallelConfig(context_parallel_size=2,
                                                       cp_comm_type="a2a+p2p"), use_te=True)
    # The reference path ignores cp_comm_type (it all-gathers K/V itself).
    build_transformer_config(MODEL, ParallelConfig(context_parallel_size=2, cp_comm_type="a2a+p2p"),
                             use_te=False)


def test_fp8_delayed_scaling_is_refused_with_data_parallelism():
    delayed = PrecisionConfig(bf16=True, fp8="hybrid", fp8_recipe="delayed")
    with pytest.raises(ValueError, match=r"fp8_recipe='delayed' with data parallelism \(DP=2\).*"
                                         r"precision.fp8_recipe=tensorwise"):
        setup_checks.check_fp8_data_parallel(delayed, 2)
    setup_checks.check_fp8_data_parallel(delayed, 1)
    setup_checks.check_fp8_data_parallel(
        PrecisionConfig(bf16=True, fp8="hybrid", fp8_recipe="tensorwise"), 8)
    setup_checks.check_fp8_data_parallel(PrecisionConfig(bf16=True), 8)


def test_dry_run_refuses_fp8_delayed_scaling_with_data_parallelism():
    from megatron_solopo.config import config_from_dict
    from megatron_solopo.training.planner import dry_run

    raw = {"model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
                     "num_attention_heads": 4, "vocab_size": 100},
           "precision": {"bf16": True, "fp8": "hybrid", "fp8_recipe": "delayed"},
           "objective": {"name": "simpo"}}
    with pytest.raises(ValueError, match="tensorwise"):
        dry_run(config_from_dict(raw), world_size=2)
    raw["precision"]["fp8_recipe"] = "tensorwise"
    assert "DP=2" in dry_run(config_from_dict(raw), world_size=2)


def test_interleaved_pipeline_with_two_stages_never_batches_p2p():
    two = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    four = ParallelConfig(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2)
    assert setup_checks.default_batch_p2p_comm(two, cuda=True) is False
    assert setup_checks.default_batch_p2p_comm(four, cuda=True) is True
    assert setup_checks.default_batch_p2p_comm(ParallelConfig(pipeline_model_parallel_size=2),
                                               cuda=True) is True
    assert setup_checks.default_batch_p2p_comm(four, cuda=False) is False  # gloo
    assert build_transformer_config(MODEL, two).batch_p2p_comm is False
    model = ModelConfig(**{**MODEL.__dict__, "transformer_overrides": {"batch_p2p_comm": True}})
    with pytest.raises(ValueError, match=r"transformer_overrides.batch_p2p_comm=true with the "
                                         r"interleaved schedule and PP=2"):
        build_transformer_config(model, two)
    assert build_transformer_config(model, four).batch_p2p_comm is True


def test_gradient_accumulation_fusion_only_with_apex(monkeypatch, te_and_cuda):
    monkeypatch.setattr(setup_checks, "grad_accum_fusion_available", lambda: False)
    precision = PrecisionConfig(bf16=True)
    config = build_transformer_config(MODEL, ParallelConfig(), precision, use_te=True)
    assert config.gradient_accumulation_fusion is False
    model = ModelConfig(**{**MODEL.__dict__,
                           "transformer_overrides": {"gradient_accumulation_fusion": True}})
    with pytest.raises(ValueError, match=r"gradient_accumulation_fusion=true needs apex's "
                                         r"fused_weight_gradient_mlp_cuda"):
        build_transformer_config(model, ParallelConfig(), precision, use_te=True)
    monkeypatch.setattr(setup_checks, "grad_accum_fusion_available", lambda: True)
    assert build_transformer_config(MODEL, ParallelConfig(), precision,
                                    use_te=True).gradient_accumulation_fusion is True


def test_te_version_parsing():
    assert setup_checks.parse_version("2.9.0.dev0+abc123") == (2, 9)
    assert setup_checks.parse_version("2.18.1") == (2, 18)
    assert setup_checks.parse_version("3") == (3, 0)

"""Layout validation, launcher environment detection and the CPU compatibility module."""

import pytest
import torch

from megatron_solopo.model.config import ModelConfig
from megatron_solopo.parallel import cpu_compat
from megatron_solopo.parallel.distributed import (DistributedEnv, detect_distributed_env,
                                                  first_slurm_host, initialize_distributed)
from megatron_solopo.parallel.layout import ParallelConfig, validate_parallel_layout


def validate(world, heads=4, groups=4, layers=4, **parallel):
    return validate_parallel_layout(ParallelConfig(**parallel), world, num_layers=layers,
                                    num_attention_heads=heads, num_query_groups=groups)


def test_valid_layout_returns_data_parallel_size():
    assert validate(16, tensor_model_parallel_size=2, context_parallel_size=2) == 4
    assert validate(8, heads=8, groups=2, layers=8, tensor_model_parallel_size=4,
                    pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2) == 1


def test_tp3_with_four_heads_names_every_factor():
    with pytest.raises(ValueError) as err:
        validate(6, heads=4, groups=4, tensor_model_parallel_size=3)
    message = str(err.value)
    assert "num_attention_heads=4 is not divisible by TP=3" in message
    for factor in ("world size=6", "tensor_model_parallel_size(TP)=3", "context_parallel_size(CP)=1",
                   "pipeline_model_parallel_size(PP)=1", "num_layers=4", "num_query_groups=4"):
        assert factor in message


def test_world_size_not_divisible():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by TP\*CP\*PP = 2\*2\*1"):
        validate(6, tensor_model_parallel_size=2, context_parallel_size=2)


@pytest.mark.parametrize("fields,expected", [
    (dict(pipeline_model_parallel_size=3), "num_layers=4 is not divisible by PP\\*VPP"),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4),
     "not divisible by PP\\*VPP = 2\\*4"),
    (dict(sequence_parallel=True), "sequence_parallel needs TP > 1"),
    (dict(context_parallel_size=0), "context_parallel_size must be >= 1"),
])
def test_other_misconfigurations(fields, expected):
    world = 2 * fields.get("pipeline_model_parallel_size", 1) * 3
    with pytest.raises(ValueError, match=expected):
        validate(world, **fields)


def test_kv_heads_and_tp_must_divide():
    with pytest.raises(ValueError, match="num_query_groups=3"):
        validate(4, heads=12, groups=3, tensor_model_parallel_size=4)
    assert validate(8, heads=8, groups=2, tensor_model_parallel_size=8) == 1  # KV heads replicated


def test_misconfigured_layout_fails_before_any_collective():
    env = DistributedEnv(rank=0, world_size=6, local_rank=0, master_addr="127.0.0.1",
                         master_port=1, launcher="torchrun")
    model = ModelConfig(num_layers=4, num_attention_heads=4, vocab_size=100)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by TP=3"):
        initialize_distributed(ParallelConfig(tensor_model_parallel_size=3), env, model=model)
    assert not torch.distributed.is_initialized()


def test_torchrun_environment():
    env = detect_distributed_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                  "MASTER_ADDR": "node7", "MASTER_PORT": "6000"})
    assert env == DistributedEnv(3, 8, 1, "node7", 6000, "torchrun")


def test_slurm_environment_uses_first_host_of_nodelist():
    env = detect_distributed_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                  "SLURM_JOB_NODELIST": "gpu-a[012-015,020]", "SLURM_JOB_ID": "42"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (9, 16, 1, "gpu-a012")
    assert env.launcher == "slurm" and env.master_port == 29542


@pytest.mark.parametrize("nodelist,host", [("node1", "node1"), ("n[3-5]", "n3"),
                                           ("gpu[07,09],cpu1", "gpu07"), ("a-b,c", "a-b"),
                                           ("gpu[012-015]-ib", "gpu012-ib"),
                                           ("gpu-a[001-004,007],gpu-b012", "gpu-a001")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_bad_environment_value_is_named():
    with pytest.raises(ValueError, match="SLURM_NTASKS='x'"):
        detect_distributed_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "x",
                                "SLURM_JOB_NODELIST": "n1"})


@pytest.mark.parametrize("environ,message", [
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"},
     "SLURM_PROCID=2 is not a rank of a world of SLURM_NTASKS=2"),
    ({"SLURM_PROCID": "-1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"},
     "SLURM_PROCID=-1 is not a rank"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0", "SLURM_JOB_NODELIST": "n1"},
     "SLURM_NTASKS=0: the world size must be >= 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
])
def test_impossible_environments_fail_before_any_rendezvous(environ, message):
    with pytest.raises(ValueError) as err:
        detect_distributed_env(environ)
    assert message in str(err.value)


def test_single_process_default():
    assert detect_distributed_env({}).launcher == "single"


def test_cpu_shims_are_a_no_op_with_cuda(monkeypatch):
    monkeypatch.setattr(cpu_compat, "applied_shims", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.install_cpu_shims() == []
    assert cpu_compat.applied_shims == []


def test_cpu_shims_installed_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    applied = cpu_compat.install_cpu_shims()
    assert {"current_device", "rng", "cuda_literals", "tensor_type_strings"} <= set(applied)
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"  # what megatron's optimizers check
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64  # casting still works
    import megatron.core  # noqa: F401  (importable without triton)


def test_fp8_without_transformer_engine_asks_for_it():
    from megatron_solopo.model.config import PrecisionConfig, build_transformer_config

    with pytest.raises(ValueError, match="precision.fp8 needs Transformer Engine"):
        build_transformer_config(ModelConfig(vocab_size=100), ParallelConfig(),
                                 PrecisionConfig(bf16=True, fp8="hybrid"), use_te=False)

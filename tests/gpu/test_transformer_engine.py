"""The Transformer Engine path (CUDA + TE): TE attention on packed THD micro-batches, and under
context parallelism with TE's own CP attention, against the reference path; a converted
checkpoint loaded into the TE spec (whose norms carry an ``_extra_state`` the converter does not
write); fp32 sent to the reference path; FP8 training steps. Skipped (and reported as skipped)
without CUDA and TE; the CP tests also need two or four GPUs."""

import pytest
import torch

from tests.distributed.common import MIXED_SHAPES, assert_close, check_layout
from tests.harness import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.te]

# bf16 compute: log-probs and gradients agree to bf16 accuracy, not fp32's 1e-5.
BF16_RTOL = 3e-2


def _te_logprobs(megatron_dir: str, sequences) -> tuple:
    """Rank function: a converted checkpoint loaded into the TE spec in bf16; its per-token
    log-probs and the class of its final norm."""
    import dataclasses

    from megatron_solopo.convert.verify import pack_sequences, split_packed
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import ModelConfig, PrecisionConfig, build_transformer_config
    from megatron_solopo.model.logprobs import forward_packed
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training import checkpoint as ckpt

    model_cfg = dataclasses.replace(ModelConfig(**ckpt.read_run_config(megatron_dir)["model"]),
                                    attention_backend="te")
    initialize_distributed(ParallelConfig(), model=model_cfg)
    padded = model_cfg.padded_vocab_size(1)
    config = build_transformer_config(model_cfg, ParallelConfig(), PrecisionConfig(bf16=True))
    (model,) = build_model(model_cfg, config, padded_vocab_size=padded)
    ckpt.load_checkpoint(megatron_dir, [model], padded_vocab_size=padded)
    batch = pack_sequences(sequences, pad_multiple=2)
    with torch.no_grad():
        logps = forward_packed(model.eval(), batch.to(torch.cuda.current_device()),
                               model_cfg.vocab_size).cpu()
    norm = type(model.decoder.final_layernorm)
    return [x.tolist() for x in split_packed(logps, batch)], f"{norm.__module__}.{norm.__name__}"


def test_converted_checkpoint_loads_into_the_te_spec_and_matches_transformers(tmp_path):
    """The converter writes no norm `_extra_state`; TE's final norm asks for one."""
    from megatron_solopo.convert.hf_to_megatron import hf_to_megatron
    from megatron_solopo.convert.tiny import make_tiny_hf_checkpoint
    from megatron_solopo.convert.verify import hf_logprobs

    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", "llama_gqa_untied")
    hf_to_megatron(hf_dir, tmp_path / "megatron")
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 300, (n,), generator=generator).tolist() for n in (17, 64, 5)]
    ((ours, norm),) = run_distributed(_te_logprobs, 1, str(tmp_path / "megatron"), sequences,
                                      backend="nccl")
    assert norm.startswith("transformer_engine"), norm
    theirs = hf_logprobs(str(hf_dir), sequences)
    for mine, reference in zip(ours, theirs, strict=True):
        assert_close(torch.tensor(mine), reference, "bf16 TE log-probs vs transformers", BF16_RTOL)


def _fp32_backends() -> dict:
    """Rank function: what fp32 gets where TE is installed."""
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import PrecisionConfig, build_transformer_config
    from megatron_solopo.model.logprobs import forward_packed
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from tests.distributed.common import make_micro_batches, tiny_model

    model_cfg = tiny_model(attention_backend="auto")
    initialize_distributed(ParallelConfig(), model=model_cfg)
    config = build_transformer_config(model_cfg, ParallelConfig(), PrecisionConfig())
    (model,) = build_model(model_cfg, config)
    (batch,), _ = make_micro_batches(1, 2)
    logps = forward_packed(model, batch.to(torch.cuda.current_device()), model_cfg.vocab_size)
    logps.sum().backward()
    result = {"te_modules": sum(type(m).__module__.startswith("transformer_engine")
                                for m in model.modules()),
              "finite": bool(torch.isfinite(logps).all())}
    try:
        build_transformer_config(tiny_model(attention_backend="te"), ParallelConfig(),
                                 PrecisionConfig())
        result["te_in_fp32"] = "accepted"
    except ValueError as err:
        result["te_in_fp32"] = str(err)
    return result


def test_fp32_takes_the_reference_path_and_te_attention_in_fp32_is_refused():
    """TE attention has no fp32 kernel for THD: 'No dot product attention backend' otherwise."""
    (result,) = run_distributed(_fp32_backends, 1, backend="nccl")
    assert result["te_modules"] == 0 and result["finite"], result
    assert "needs precision.bf16=true" in result["te_in_fp32"], result


def _fp8_train(raw: dict) -> dict:
    """Rank function: FP8 training steps; the token count of every micro-batch they packed."""
    from tests.distributed.trainer_common import train

    counts = []

    def record(trainer):
        build = trainer.builder.build

        def recording_build(*args, **kwargs):
            step = build(*args, **kwargs)
            counts.extend(batch.num_tokens for batch in step.micro_batches)
            return step

        trainer.builder.build = recording_build

    result = train(raw, patch=record)
    return dict(result, token_counts=counts)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs compute capability 8.9+ (Ada, Hopper, Blackwell)")
def test_fp8_training_steps_pack_to_te_alignment_and_learn(tmp_path):
    from tests.distributed.trainer_common import base_config, make_dataset

    paths = make_dataset(tmp_path / "data", num_records=16, long_length=60)
    raw = base_config(paths, str(tmp_path), objective={"name": "simpo"},
                      model={"attention_backend": "te"}, training={"train_iters": 4},
                      precision={"bf16": True, "fp8": "hybrid", "fp8_recipe": "tensorwise"})
    (result,) = run_distributed(_fp8_train, 1, raw, backend="nccl")
    assert result["token_counts"] and all(n % 16 == 0 for n in result["token_counts"]), result
    losses = result["losses"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


def test_te_matches_reference_path_single_gpu():
    """TE layers + TE THD attention vs the reference layers, same weights, DP=1."""
    run_distributed(check_layout, 1, dict(), attention_backend="te",
                    reference_backend="reference", bf16=True, rtol=BF16_RTOL, backend="nccl",
                    shapes=MIXED_SHAPES)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for CP=2")
@pytest.mark.parametrize("cp_comm_type", ["p2p", "all_gather"])
def test_te_context_parallel_matches_cp1(cp_comm_type):
    from megatron_solopo.model.setup_checks import CP_THD_MIN_TE, installed_te_version

    if installed_te_version() < CP_THD_MIN_TE[cp_comm_type]:
        pytest.skip(f"cp_comm_type={cp_comm_type} with THD needs TE >= {CP_THD_MIN_TE[cp_comm_type]} "
                    f"(refused at set-up, tests/unit/test_gpu_setup_checks.py)")
    run_distributed(check_layout, 2, dict(context_parallel_size=2, cp_comm_type=cp_comm_type),
                    attention_backend="te", bf16=True, rtol=BF16_RTOL, backend="nccl",
                    shapes=MIXED_SHAPES)


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs for CP=2 x TP=2")
def test_te_context_parallel_with_tensor_parallel():
    run_distributed(check_layout, 4, dict(context_parallel_size=2, tensor_model_parallel_size=2,
                                          sequence_parallel=True),
                    attention_backend="te", bf16=True, rtol=BF16_RTOL, backend="nccl")


# Qwen3's per-head q/k RMSNorm (TENorm in the TE spec) with YaRN (its attention factor lives in
# the softmax scale, model/rope.py).
QWEN3_YARN = dict(family="qwen3", qk_layernorm=True, kv_channels=32, max_position_embeddings=64,
                  rope_scaling={"type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 16})


def test_te_qwen3_yarn_matches_reference_path_single_gpu():
    run_distributed(check_layout, 1, dict(), attention_backend="te",
                    reference_backend="reference", bf16=True, rtol=BF16_RTOL, backend="nccl",
                    shapes=MIXED_SHAPES, model_overrides=QWEN3_YARN)


def _te_softmax_scales(model_fields: dict, attention_backend: str = "te"):
    """Rank function: the softmax scale every TE core attention of a built model uses, and the
    TransformerConfig's."""
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import build_transformer_config
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from tests.distributed.common import tiny_model

    model = tiny_model(**model_fields, attention_backend=attention_backend)
    initialize_distributed(ParallelConfig(), model=model)
    config = build_transformer_config(model, ParallelConfig())
    (gpt,) = build_model(model, config)
    scales = {float(layer.self_attention.core_attention.softmax_scale)
              for layer in gpt.decoder.layers}
    norms = {type(layer.self_attention.q_layernorm).__name__ for layer in gpt.decoder.layers}
    return sorted(scales), config.softmax_scale, sorted(norms)


def test_te_attention_uses_the_yarn_softmax_scale():
    """The YaRN attention factor reaches TE's attention (fp32 parity with transformers is on CPU,
    tests/distributed/test_model_families.py; bf16 could not see a 1e-3 change)."""
    ((scales, expected, norms),) = run_distributed(_te_softmax_scales, 1, QWEN3_YARN,
                                                   backend="nccl")
    assert expected is not None and expected > 1 / 32 ** 0.5
    assert scales == [pytest.approx(expected, rel=1e-12)]
    assert norms and "IdentityOp" not in norms  # q/k norms exist (TE's RMSNorm)

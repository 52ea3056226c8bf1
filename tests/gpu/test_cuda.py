"""Our own paths on a GPU without Transformer Engine (local spec + reference attention, NCCL),
also where TE is installed: a converted checkpoint's log-probs computed on CUDA match
transformers', and the trainer runs on CUDA (learns, and a stopped + resumed run follows the
uninterrupted one) with no TE module in the model. Skipped without CUDA; the bodies are
device-agnostic (gloo on CPU), so they can be checked anywhere. Ranks are spawned
(tests/harness.py): a forked child of a process that touched CUDA cannot use it."""

import math

import pytest
import torch

from tests.distributed.trainer_common import (base_config, logging_result, make_dataset,
                                              prepare_starting_point, train)
from tests.harness import run_distributed

pytestmark = pytest.mark.gpu
BACKEND = "nccl" if torch.cuda.is_available() else "gloo"


def _no_tf32() -> None:
    """fp32 parity at 1e-5 needs true fp32 matmuls: NGC images turn TF32 on for cuBLAS
    (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1), which rounds inputs to 10 mantissa bits."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


@pytest.fixture
def fp32_matmuls(monkeypatch):
    """Read by the spawned ranks' CUDA libraries at their first use."""
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0")
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")


def _logprobs_and_device(megatron_dir, sequences):
    """Rank function: verify's per-token log-probs, and the device(s) the built model was on."""
    import megatron_solopo.model.build as build_module
    from megatron_solopo.convert.verify import megatron_logprobs

    _no_tf32()
    devices = set()
    build_model = build_module.build_model

    def recording_build_model(*args, **kwargs):
        chunks = build_model(*args, **kwargs)
        devices.update(p.device.type for chunk in chunks for p in chunk.parameters())
        devices.update(b.device.type for chunk in chunks for b in chunk.buffers())
        return chunks

    build_module.build_model = recording_build_model  # verify imports it at call time
    try:
        logps = megatron_logprobs(megatron_dir, sequences)
    finally:
        build_module.build_model = build_model
    return [x.tolist() for x in logps], sorted(devices)


def test_converted_checkpoint_logprobs_on_device_match_transformers(tmp_path, fp32_matmuls):
    from megatron_solopo.convert.hf_to_megatron import hf_to_megatron
    from megatron_solopo.convert.tiny import make_tiny_hf_checkpoint
    from megatron_solopo.convert.verify import hf_logprobs

    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", "qwen2_bias_tied")
    hf_to_megatron(hf_dir, tmp_path / "megatron")
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 300, (n,), generator=generator).tolist() for n in (17, 64, 5)]
    ((ours, devices),) = run_distributed(_logprobs_and_device, 1, str(tmp_path / "megatron"),
                                         sequences, backend=BACKEND)
    assert devices == (["cuda"] if torch.cuda.is_available() else ["cpu"])
    theirs = hf_logprobs(str(hf_dir), sequences)
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.allclose(torch.tensor(mine), reference, rtol=1e-5, atol=1e-5)


def _module_libraries(raw: dict) -> list:
    """Rank function: the top-level packages of every module class of the trainer's model."""
    from megatron_solopo.config import config_from_dict
    from megatron_solopo.training.trainer import Trainer

    trainer = Trainer(config_from_dict(raw)).setup()
    return sorted({type(module).__module__.split(".")[0]
                   for chunk in trainer.model for module in chunk.modules()})


def test_trainer_on_device_learns_and_resumes(tmp_path, fp32_matmuls):
    paths = make_dataset(tmp_path / "data", num_records=32)
    paths["init"] = str(tmp_path / "init")
    objective = {"name": "longpo", "beta": 0.5, "lambda": 1.0}
    reference_path = {"attention_backend": "reference"}
    run_distributed(prepare_starting_point, 1,
                    base_config(paths, str(tmp_path), objective=objective, model=reference_path),
                    paths["init"], backend=BACKEND)

    def config(iters, **sections):
        return base_config(paths, str(tmp_path), objective=objective, model=reference_path,
                           training={"train_iters": iters}, scheduler={"lr_decay_iters": 6},
                           **sections)

    # The path this test claims: no Transformer Engine module, even where TE is installed
    # (Megatron would otherwise build the final norm as TENorm).
    (libraries,) = run_distributed(_module_libraries, 1, config(6), backend=BACKEND)
    assert "transformer_engine" not in libraries and "megatron" in libraries, libraries
    full = logging_result(run_distributed(train, 1, config(6), backend=BACKEND))["losses"]
    assert all(math.isfinite(x) for x in full) and full[-1] < full[0]
    save = {"save": str(tmp_path / "run"), "load": str(tmp_path / "run")}
    run_distributed(train, 1, config(3, checkpoint=dict(save)), backend=BACKEND)
    resumed = logging_result(run_distributed(train, 1, config(6, checkpoint=dict(save)),
                                             backend=BACKEND))["losses"]
    # GPU kernels may reduce in a different order from run to run: close, not bit for bit.
    assert len(resumed) == 3
    for a, b in zip(resumed, full[3:], strict=True):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (resumed, full)

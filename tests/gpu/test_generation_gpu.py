"""Generation on a GPU: the Hugging Face backend on CUDA gives the CPU's greedy answers on a tiny
model, and vLLM in process (when installed) answers every request with its n samples and the
chat template's prompt length. Skipped without CUDA (the vLLM test also without vLLM)."""

import pytest

from megatron_solopo.generation import GenerationRequest, GeneratorConfig, SamplingParams, \
    build_generator

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_solopo.convert.tiny import make_tiny_hf_checkpoint

    return str(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf_gpu"), "llama_gqa_untied",
                                       max_position_embeddings=2048))


def _requests(params):
    return [GenerationRequest([{"role": "user", "content": "x " * k + "?"}], params, key=f"k{k}")
            for k in (1, 7, 3)]


def test_hf_backend_on_cuda_matches_cpu_greedy(tiny_hf):
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    answers = {}
    for device in ("cpu", "cuda"):
        generator = build_generator(GeneratorConfig(backend="hf", model=tiny_hf, device=device,
                                                    dtype="float32", progress=False))
        assert next(generator.model.parameters()).device.type == device
        answers[device] = [c.texts for c in generator.generate(_requests(greedy))]
    assert answers["cuda"] == answers["cpu"]


def test_vllm_backend_in_process(tiny_hf):
    pytest.importorskip("vllm")
    generator = build_generator(GeneratorConfig(backend="vllm", model=tiny_hf, dtype="float32",
                                                max_model_len=1024, gpu_memory_utilization=0.3,
                                                progress=False))
    params = SamplingParams(temperature=0.85, max_new_tokens=8, n=4)
    completions = generator.generate(_requests(params))
    assert [len(c.texts) for c in completions] == [4, 4, 4]
    for request, completion in zip(_requests(params), completions):
        prompt = generator.render(request.messages)
        expected = len(generator.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert completion.num_prompt_tokens == expected
        assert 4 <= completion.num_generated_tokens <= 32
    # per-request seeds: the same requests give the same answers
    assert [c.texts for c in generator.generate(_requests(params))] == \
        [c.texts for c in completions]

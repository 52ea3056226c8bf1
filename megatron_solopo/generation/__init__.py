"""Text generation behind one small interface, for building training data (construct/) and for
evaluation. It knows nothing of training.

    from megatron_solopo.generation import GeneratorConfig, GenerationRequest, SamplingParams, \\
        build_generator
    generator = build_generator(GeneratorConfig(backend="hf", model="/ckpt/hf"))
    [completion] = generator.generate([GenerationRequest(
        [{"role": "user", "content": "Hi"}], SamplingParams(temperature=0.7, n=4), key="q1")])

Backends (``GeneratorConfig.backend``): ``hf`` (transformers; CPU or GPU), ``vllm`` (in process,
extra ``vllm``), ``openai`` (any OpenAI-compatible chat-completions server, standard library only).
Prompts use the tokenizer's chat template (the server's, for ``openai``); requests are
length-sorted and batched; a progress bar shows ETA, prompts/s and generated tokens/s.
"""

from megatron_solopo.generation.base import (Completion, GenerationError, GenerationRequest,
                                             Generator, GeneratorConfig, SamplingParams,
                                             request_seed)

BACKENDS = ("hf", "vllm", "openai")

__all__ = ["BACKENDS", "Completion", "GenerationError", "GenerationRequest", "Generator",
           "GeneratorConfig", "SamplingParams", "build_generator", "request_seed"]


def build_generator(config: GeneratorConfig) -> Generator:
    if config.backend == "hf":
        from megatron_solopo.generation.hf import HFGenerator

        return HFGenerator(config)
    if config.backend == "vllm":
        from megatron_solopo.generation.vllm import VLLMGenerator

        return VLLMGenerator(config)
    if config.backend == "openai":
        from megatron_solopo.generation.openai import OpenAIGenerator

        return OpenAIGenerator(config)
    raise GenerationError(f"--backend {config.backend!r}; valid: {', '.join(BACKENDS)}")

"""vLLM in process (``pip install megatron-solopo[vllm]``): tensor parallel, continuous batching,
prefix caching, long prompts. Prompts are rendered with the tokenizer's chat template and passed
as token ids; each request carries its own seed (from the run's seed and its key), so answers do
not depend on what else is in flight."""

from __future__ import annotations

from typing import Sequence

from megatron_solopo.generation.base import (Completion, GenerationError, GenerationRequest,
                                             Generator, GeneratorConfig, ProgressMeter,
                                             request_seed)

# Requests handed to vLLM per call: vLLM batches inside a call; between calls the bar advances.
_REQUESTS_PER_CALL = 256


class VLLMGenerator(Generator):
    def __init__(self, config: GeneratorConfig):
        try:
            import vllm
        except ImportError:
            raise GenerationError("--backend vllm needs vLLM: pip install megatron-solopo[vllm] "
                                  "(on a machine with CUDA)") from None
        self.config = config
        self.vllm = vllm
        overrides = {}
        if config.rope_theta is not None:
            overrides["rope_theta"] = float(config.rope_theta)
        if config.rope_scaling:
            overrides["rope_scaling"] = dict(config.rope_scaling)
        kwargs = dict(model=config.model, tokenizer=config.tokenizer or config.model,
                      tensor_parallel_size=config.tensor_parallel_size, dtype=config.dtype,
                      seed=config.seed, gpu_memory_utilization=config.gpu_memory_utilization,
                      enable_prefix_caching=True)
        if config.max_model_len:
            kwargs["max_model_len"] = config.max_model_len
        if overrides:
            kwargs["hf_overrides"] = overrides
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def _prompt_ids(self, request: GenerationRequest) -> list:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.render(request.messages)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(self.render(request.messages))["input_ids"]

    def generate(self, requests: Sequence[GenerationRequest], desc: str = "generating") -> list:
        vllm = self.vllm
        prompts = [self._prompt_ids(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (-len(prompts[i]), i))
        results: list = [None] * len(requests)
        meter = ProgressMeter(len(requests), desc, self.config.progress)
        try:
            for start in range(0, len(order), _REQUESTS_PER_CALL):
                chunk = order[start:start + _REQUESTS_PER_CALL]
                sampling = [vllm.SamplingParams(
                    n=requests[i].params.n, temperature=requests[i].params.temperature,
                    top_p=requests[i].params.top_p, max_tokens=requests[i].params.max_new_tokens,
                    seed=request_seed(self.config.seed, requests[i].key)) for i in chunk]
                outputs = self.llm.generate([{"prompt_token_ids": prompts[i]} for i in chunk],
                                            sampling_params=sampling, use_tqdm=False)
                if len(outputs) != len(chunk):
                    raise GenerationError(f"vLLM returned {len(outputs)} outputs for "
                                          f"{len(chunk)} prompts")
                for index, output in zip(chunk, outputs):
                    samples = sorted(output.outputs, key=lambda o: o.index)
                    results[index] = Completion(
                        [s.text.strip() for s in samples], len(prompts[index]),
                        sum(len(s.token_ids) for s in samples))
                meter.update(len(chunk), sum(results[i].num_generated_tokens for i in chunk))
        finally:
            meter.close()
        return results

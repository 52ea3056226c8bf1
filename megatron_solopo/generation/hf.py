"""Hugging Face transformers backend: CPU or GPU, batched and length-sorted, left padding.

Determinism: before each batch the torch generator is seeded from the run's seed and the keys of
the batch's requests, so the same requests in the same batches give the same answers."""

from __future__ import annotations

import os
from typing import Sequence

from megatron_solopo.generation.base import (Completion, GenerationError, GenerationRequest,
                                             Generator, GeneratorConfig, ProgressMeter,
                                             load_hf_tokenizer, request_seed)


def apply_rope_override(config, rope_theta=None, rope_scaling=None) -> None:
    """Set RoPE theta / scaling on a transformers config (``rope_parameters`` in transformers 5,
    ``rope_theta``/``rope_scaling`` before)."""
    if rope_theta is None and rope_scaling is None:
        return
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params = dict(params)
        if rope_scaling:
            params.update(rope_scaling)
        if rope_theta is not None:
            params["rope_theta"] = float(rope_theta)
        config.rope_parameters = params
        return
    if rope_theta is not None:
        config.rope_theta = float(rope_theta)
    if rope_scaling:
        config.rope_scaling = dict(rope_scaling)


class HFGenerator(Generator):
    def __init__(self, config: GeneratorConfig):
        try:
            import torch
            import transformers
        except ImportError:
            raise GenerationError("--backend hf needs transformers: "
                                  "pip install megatron-solopo[hf]") from None
        self.config = config
        self.torch = torch
        self.tokenizer = load_hf_tokenizer(config.tokenizer or config.model,
                                           "--tokenizer" if config.tokenizer else "--model")
        try:
            model_config = transformers.AutoConfig.from_pretrained(config.model)
        except (OSError, ValueError) as err:
            raise GenerationError(f"--model {config.model}: not a Hugging Face model directory "
                                  f"({str(err).splitlines()[0]})") from None
        apply_rope_override(model_config, config.rope_theta, config.rope_scaling)
        if config.max_model_len and config.max_model_len > getattr(
                model_config, "max_position_embeddings", config.max_model_len):
            model_config.max_position_embeddings = config.max_model_len
        device = config.device
        if device == "auto":
            # One shard per GPU under torchrun/srun: each process takes its local rank's device.
            local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
            device = f"cuda:{int(local_rank) % max(torch.cuda.device_count(), 1)}" \
                if torch.cuda.is_available() else "cpu"
        dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float32": torch.float32}.get(config.dtype)
        if dtype is None:
            raise GenerationError(f"--dtype {config.dtype!r}; valid: auto, bfloat16, float16, "
                                  f"float32")
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            config.model, config=model_config, dtype=dtype).to(device).eval()
        self.device = device
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))

    def _encode(self, request: GenerationRequest) -> list:
        text = self.render(request.messages)
        # A chat template writes its own BOS; the plain template relies on the tokenizer's.
        return self.tokenizer(text, add_special_tokens=not self.templated)["input_ids"]

    def generate(self, requests: Sequence[GenerationRequest], desc: str = "generating") -> list:
        encoded = [self._encode(r) for r in requests]
        results: list = [None] * len(requests)
        meter = ProgressMeter(len(requests), desc, self.config.progress)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        # Requests with different sampling settings cannot share a generate() call.
        by_params: dict = {}
        for index, request in enumerate(requests):
            by_params.setdefault(request.params, []).append(index)
        try:
            for members in by_params.values():
                # Longest first: similar lengths share a batch (little padding), and an
                # out-of-memory error shows at the start, not after hours.
                members.sort(key=lambda i: (-len(encoded[i]), i))
                for start in range(0, len(members), self.config.batch_size):
                    batch = members[start:start + self.config.batch_size]
                    for index, completion in zip(batch, self._batch(requests, encoded, batch,
                                                                    eos, pad)):
                        results[index] = completion
                    meter.update(len(batch), sum(results[i].num_generated_tokens for i in batch))
        finally:
            meter.close()
        return results

    def _batch(self, requests, encoded, batch, eos, pad) -> list:
        torch = self.torch
        params = requests[batch[0]].params
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            tokens = encoded[index]
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
        torch.manual_seed(request_seed(self.config.seed, "\0".join(requests[i].key for i in batch)))
        sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p) \
            if params.temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=params.max_new_tokens, num_return_sequences=params.n,
                pad_token_id=pad, eos_token_id=eos, top_k=0, **sampling)
        generated = out[:, width:].cpu().tolist()
        completions = []
        for row, index in enumerate(batch):
            texts, num_generated = [], 0
            for sample in generated[row * params.n:(row + 1) * params.n]:
                if eos in sample:
                    sample = sample[:sample.index(eos) + 1]
                num_generated += len(sample)
                texts.append(self.tokenizer.decode(sample, skip_special_tokens=True).strip())
            completions.append(Completion(texts, len(encoded[index]), num_generated))
        return completions

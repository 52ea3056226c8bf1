"""Running an evaluation: answers generated and scored example by example, streamed to disk.

``answer_examples`` writes one JSON line per example to ``results.jsonl`` (flushed and synced
after every chunk of ``chunk_size`` examples); started again on the same file, it skips the
examples already there, so a long evaluation resumes where it stopped. A ``results.jsonl.meta.json``
beside it records what produced the answers (checkpoint, decoding settings): resuming with other
settings is refused instead of mixing answers of two models. A torn last line (a kill during a
write) is dropped and redone.

``preference_metrics`` computes reward accuracy and margin on held-out preference records with
transformers, log-probs in fp32 (the trainer's math: the sum of the response tokens'
log-softmax of fp32 logits).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from megatron_solopo.evaluation import metrics as metrics_lib
from megatron_solopo.evaluation.tasks import EvalExample


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    with open(path, "rb") as handle:
        data = handle.read()
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # torn last line
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(good)
    return rows


def score(prediction: str, answers: Sequence[str]) -> dict:
    return {"sub_em": metrics_lib.sub_em(prediction, answers),
            "f1": metrics_lib.f1(prediction, answers)}


def answer_examples(generator, examples: Sequence[EvalExample], results_path, *,
                    settings: dict, max_new_tokens: int = 32, chunk_size: int = 64,
                    temperature: float = 0.0, log=print) -> list[dict]:
    """Answer every example with ``generator`` (generation backend), greedy by default; returns
    every row (earlier runs' included). ``settings`` identifies the model and decoding."""
    from megatron_solopo.generation import GenerationRequest, SamplingParams

    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = results_path.with_name(results_path.name + ".meta.json")
    settings = dict(settings, max_new_tokens=max_new_tokens, temperature=temperature)
    if meta_path.exists():
        previous = json.loads(meta_path.read_text())
        if previous != json.loads(json.dumps(settings)):
            changed = sorted(k for k in set(previous) | set(settings)
                             if previous.get(k) != settings.get(k))
            raise ValueError(f"{results_path} holds answers made with other settings ({', '.join(changed)} "
                             f"differ): use another output directory, or delete it to start over")
    else:
        tmp = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
        os.replace(tmp, meta_path)
    rows = _read_rows(results_path)
    done = {row["id"] for row in rows}
    todo = [example for example in examples if example.id not in done]
    if done:
        log(f"[evaluate] {results_path}: {len(done)} answers already there, {len(todo)} to go")
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    with open(results_path, "a", encoding="utf-8") as handle:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            completions = generator.generate(
                [GenerationRequest(example.messages(), params, key=example.id) for example in chunk],
                desc="evaluating")
            for example, completion in zip(chunk, completions):
                prediction = completion.texts[0]
                row = {"id": example.id, "task": example.task, "length": example.length,
                       "prediction": prediction, "answers": list(example.answers),
                       "prompt_tokens": completion.num_prompt_tokens,
                       **score(prediction, example.answers)}
                handle.write(json.dumps(row) + "\n")
                rows.append(row)
            handle.flush()
            os.fsync(handle.fileno())
    return rows


# ----------------------------------------------------------------------------------------------
# Preference metrics
# ----------------------------------------------------------------------------------------------
class SequenceScorer:
    """Summed response log-probs under a Hugging Face causal LM, in fp32."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        self.device = device

    def logps(self, sequences: Sequence[tuple[list, list]]) -> list[float]:
        """``[(prompt_ids, response_ids)]`` -> sum of log p(response token | everything before)."""
        torch = self.torch
        values = []
        with torch.no_grad():
            for prompt, response in sequences:
                ids = torch.tensor([list(prompt) + list(response)], device=self.device)
                logits = self.model(input_ids=ids).logits[0, :-1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                targets = ids[0, 1:]
                token = logprobs.gather(-1, targets[:, None])[:, 0]
                values.append(float(token[len(prompt) - 1:].sum()))
        return values


def preference_metrics(model_dir: str, records: Sequence[dict], *, reference_dir: Optional[str] = None,
                       beta: float = 0.1, tokenizer_dir: Optional[str] = None,
                       device: str = "cpu") -> dict:
    """Reward accuracy / margin on single-turn preference records (docs/data.md schema), per
    context present (``short``, ``long``). Reward: ``beta * (logp_pi - logp_ref)`` with a
    reference model, else ``beta * logp_pi`` (summed response log-probs)."""
    from megatron_solopo.data.tokenizers import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(tokenizer_dir or model_dir)
    policy = SequenceScorer(model_dir, device)
    reference = SequenceScorer(reference_dir, device) if reference_dir else None
    out: dict = {}
    for context_kind in ("short", "long"):
        pairs, sequences = 0, []
        for record in records:
            context = record.get(f"{context_kind}_context")
            if not context or "turns" in record:
                continue
            prompt = tokenizer.encode_prompt(record.get("system"), context, record["prompt"])
            for response in ("chosen", "rejected"):
                text = record[response]
                text = text["content"] if isinstance(text, dict) else text
                sequences.append((prompt, tokenizer.encode_response(text)))
            pairs += 1
        if not pairs:
            continue
        values = policy.logps(sequences)
        if reference is not None:
            values = [v - r for v, r in zip(values, reference.logps(sequences))]
        rewards = [beta * v for v in values]
        chosen, rejected = rewards[0::2], rewards[1::2]
        margins = [c - r for c, r in zip(chosen, rejected)]
        out[context_kind] = {
            "pairs": pairs,
            "rewards/accuracies": sum(m > 0 for m in margins) / pairs,
            "rewards/margins": sum(margins) / pairs,
            "rewards/chosen": sum(chosen) / pairs,
            "rewards/rejected": sum(rejected) / pairs,
        }
    if not out:
        raise ValueError("no single-turn preference record with a short or long context")
    return out

"""The generation interface every backend implements (see generation/__init__.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from typing import Optional, Sequence


class GenerationError(ValueError):
    """A backend cannot do what was asked (not installed, server unreachable, bad settings); the
    message says what to change."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's answers."""

    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = 512
    """Generated tokens per answer at most (EOS included)."""
    n: int = 1
    """Answers sampled per request."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n (samples per request) must be >= 1, got {self.n}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"greedy decoding (temperature 0) gives one answer, not n={self.n}")


@dataclasses.dataclass
class GenerationRequest:
    """One chat prompt; ``key`` identifies it across runs (its sampling seed derives from it)."""

    messages: list  # [{"role", "content"}], the user's message last
    params: SamplingParams
    key: str = ""


@dataclasses.dataclass
class Completion:
    texts: list  # list[str], params.n answers
    num_prompt_tokens: int
    num_generated_tokens: int  # over all answers


@dataclasses.dataclass
class GeneratorConfig:
    """Which model answers, and how it is run."""

    backend: str = "hf"
    """``hf`` (transformers, CPU or GPU), ``vllm`` (in process) or ``openai`` (a server)."""
    model: str = ""
    """A Hugging Face model directory (hf, vllm) or the served model name (openai)."""
    tokenizer: Optional[str] = None
    """Hugging Face tokenizer directory (default: ``model``; needed with openai to count tokens)."""
    seed: int = 0
    """Base seed; each request's seed derives from it and the request's key."""
    rope_theta: Optional[float] = None
    """Override the model's RoPE base for long prompts (hf, vllm)."""
    rope_scaling: Optional[dict] = None
    """Override the model's RoPE scaling, e.g. ``{"rope_type": "yarn", "factor": 4.0}``."""
    max_model_len: Optional[int] = None
    """Longest prompt + answer (vllm's max_model_len; hf raises max_position_embeddings to it)."""
    dtype: str = "auto"
    """Weights dtype: auto, bfloat16, float16, float32."""
    device: str = "auto"
    """hf only: cpu, cuda, cuda:1, or auto (cuda when available)."""
    batch_size: int = 8
    """hf only: prompts per forward batch (length-sorted)."""
    tensor_parallel_size: int = 1
    """vllm only."""
    gpu_memory_utilization: float = 0.9
    """vllm only."""
    base_url: Optional[str] = None
    """openai only: e.g. http://127.0.0.1:8000/v1."""
    api_key: Optional[str] = None
    """openai only (default: $OPENAI_API_KEY, else none)."""
    concurrency: int = 16
    """openai only: requests in flight."""
    max_retries: int = 5
    """openai only: retries of a failed request (exponential back-off)."""
    request_timeout: float = 600.0
    """openai only: seconds per request."""
    progress: bool = True
    """Show a progress bar on stderr."""


def request_seed(base_seed: int, key: str) -> int:
    """A 31-bit seed from the run's seed and a request key (stable across processes)."""
    digest = hashlib.sha256(f"{base_seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def render_plain(messages: Sequence[dict]) -> str:
    """The prompt for a tokenizer without a chat template (data/tokenizers.py's plain template:
    system and history each followed by a blank line, then the user's message and a newline)."""
    parts = [m["content"] + "\n\n" for m in messages[:-1]]
    return "".join(parts) + messages[-1]["content"] + "\n"


class ProgressMeter:
    """A progress bar with ETA, prompts/s and generated tokens/s (stderr)."""

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "prompt",
                 leave: bool = False):
        from tqdm import tqdm

        self.start = time.perf_counter()
        self.prompts = self.generated = 0
        # One bar per generate() call, under the run's bar (data construction), gone when done.
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave,
                        disable=not enabled, mininterval=0.5, dynamic_ncols=True)

    def update(self, num_done: int, num_generated_tokens: int, num_prompts=None) -> None:
        self.prompts += num_done if num_prompts is None else num_prompts
        self.generated += num_generated_tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.prompts / elapsed:.2f} prompts/s, "
                                 f"{self.generated / elapsed:,.0f} gen tok/s", refresh=False)
        self.bar.update(num_done)

    def close(self) -> None:
        self.bar.close()


class Generator:
    """A backend: ``generate(requests)`` returns one Completion per request, in request order."""

    config: GeneratorConfig
    tokenizer = None  # a transformers tokenizer, or None when the backend has none

    def generate(self, requests: Sequence[GenerationRequest], desc: str = "generating") -> list:
        raise NotImplementedError

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text the model sees (the tokenizer's chat template, else the plain one)."""
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=True)
        return render_plain(messages)

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            raise GenerationError("counting tokens needs a tokenizer: pass --tokenizer HF_DIR")
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def close(self) -> None:
        pass


def load_hf_tokenizer(path: str, flag: str = "--tokenizer"):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise GenerationError("the Hugging Face tokenizer needs transformers: "
                              "pip install megatron-solopo[hf]") from None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise GenerationError(f"{flag} {path}: cannot load a Hugging Face tokenizer from it "
                              f"({str(err).splitlines()[0]})") from None

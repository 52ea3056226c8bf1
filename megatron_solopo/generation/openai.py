"""Any OpenAI-compatible chat-completions server (``vllm serve``, SGLang, TGI, ...), with the
standard library only: ``POST {base_url}/chat/completions`` with ``n`` samples, requests in
flight on a thread pool, retries with exponential back-off on connection errors, 408/429 and 5xx.

The server applies the model's chat template and owns the model's settings (RoPE included: set
them when starting it). Tokens are counted from the server's ``usage`` when it reports one."""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import urllib.error
import urllib.request
from typing import Sequence

from megatron_solopo.generation.base import (Completion, GenerationError, GenerationRequest,
                                             Generator, GeneratorConfig, ProgressMeter,
                                             load_hf_tokenizer, request_seed)

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIGenerator(Generator):
    def __init__(self, config: GeneratorConfig, *, backoff_seconds: float = 1.0):
        if not config.base_url:
            raise GenerationError("--backend openai needs --base-url, e.g. "
                                  "http://127.0.0.1:8000/v1")
        if config.rope_theta is not None or config.rope_scaling:
            raise GenerationError("--rope-theta/--rope-scaling cannot be changed through a server: "
                                  "start it with them (e.g. vllm serve --hf-overrides "
                                  "'{\"rope_theta\": 1e7}')")
        self.config = config
        self.url = config.base_url.rstrip("/")
        self.api_key = config.api_key or os.environ.get("OPENAI_API_KEY")
        self.backoff_seconds = backoff_seconds
        self.tokenizer = load_hf_tokenizer(config.tokenizer) if config.tokenizer else None
        self._check_reachable()

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _check_reachable(self) -> None:
        """Fail at start, not after the first batch, when --base-url is wrong."""
        request = urllib.request.Request(self.url + "/models", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=min(30.0, self.config.request_timeout)):
                pass
        except urllib.error.HTTPError:
            pass  # the server answers; some do not implement /models
        except (urllib.error.URLError, OSError) as err:
            raise GenerationError(f"cannot reach an OpenAI-compatible server at --base-url "
                                  f"{self.config.base_url}: {getattr(err, 'reason', err)} (start "
                                  f"the server, or fix --base-url)") from None

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        last_error = ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + "/chat/completions", data=data,
                                             headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.config.request_timeout) as reply:
                    return json.loads(reply.read())
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:500]
                if err.code not in _RETRY_STATUS:
                    raise GenerationError(f"the server at --base-url {self.config.base_url} "
                                          f"refused a request: HTTP {err.code}: {detail}") from None
                last_error = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as err:
                last_error = str(getattr(err, "reason", err))
        raise GenerationError(f"no answer from the server at --base-url {self.config.base_url} "
                              f"after {self.config.max_retries + 1} attempts: {last_error}")

    def _ask(self, request: GenerationRequest, n: int, seed: int) -> tuple[list, dict]:
        params = request.params
        reply = self._post({"model": self.config.model, "messages": list(request.messages),
                            "n": n, "temperature": params.temperature, "top_p": params.top_p,
                            "max_tokens": params.max_new_tokens, "seed": seed})
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            texts = [(choice["message"].get("content") or "").strip() for choice in choices]
        except (KeyError, TypeError, AttributeError):
            raise GenerationError(f"the server at --base-url {self.config.base_url} sent an "
                                  f"answer without choices[].message.content: "
                                  f"{json.dumps(reply)[:300]}") from None
        if not texts:
            raise GenerationError(f"the server at --base-url {self.config.base_url} sent no "
                                  f"choices")
        return texts, reply.get("usage") or {}

    def _one(self, request: GenerationRequest) -> Completion:
        n = request.params.n
        seed = request_seed(self.config.seed, request.key)
        texts, usage = self._ask(request, n, seed)
        prompt_tokens, generated = usage.get("prompt_tokens"), usage.get("completion_tokens")
        # Servers without 'n' (TGI's chat API) answer once: ask for the rest one by one, each
        # with its own seed.
        extra = 0
        while len(texts) < n:
            extra += 1
            more, more_usage = self._ask(request, 1, request_seed(self.config.seed,
                                                                  f"{request.key}#{extra}"))
            texts += more[:1]
            if generated is not None and more_usage.get("completion_tokens") is not None:
                generated += more_usage["completion_tokens"]
            else:
                generated = None
        texts = texts[:n]
        if prompt_tokens is None:
            prompt_tokens = self.count_tokens(self.render(request.messages)) if self.tokenizer else 0
        if generated is None:
            generated = sum(self.count_tokens(t) for t in texts) if self.tokenizer else 0
        return Completion(texts, int(prompt_tokens), int(generated))

    def generate(self, requests: Sequence[GenerationRequest], desc: str = "generating") -> list:
        results: list = [None] * len(requests)
        meter = ProgressMeter(len(requests), desc, self.config.progress)
        # Longest first, as the other backends: the slowest requests start early.
        order = sorted(range(len(requests)),
                       key=lambda i: (-sum(len(m["content"]) for m in requests[i].messages), i))
        pool = concurrent.futures.ThreadPoolExecutor(max(1, self.config.concurrency))
        try:
            futures = {pool.submit(self._one, requests[i]): i for i in order}
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                results[index] = future.result()
                meter.update(1, results[index].num_generated_tokens)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            meter.close()
        return results

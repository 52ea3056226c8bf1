"""Generation backends (megatron_solopo/generation/): Hugging Face for real on a tiny model, the
OpenAI-compatible client against a local HTTP server on 127.0.0.1, vLLM against a fake of its API
(vLLM needs CUDA), and the errors for a backend that is not installed."""

import json
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_solopo.generation import (GenerationError, GenerationRequest, GeneratorConfig,
                                        SamplingParams, build_generator, request_seed)


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_solopo.convert.tiny import make_tiny_hf_checkpoint

    return str(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf"), "llama_gqa_untied",
                                       max_position_embeddings=2048))


@pytest.fixture(scope="module")
def hf_generator(tiny_hf):
    return build_generator(GeneratorConfig(backend="hf", model=tiny_hf, progress=False,
                                           batch_size=3, seed=5))


def test_sampling_params_checks():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(n=0),
                dict(temperature=0, n=2)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert request_seed(0, "a") == request_seed(0, "a") != request_seed(1, "a")


def test_hf_chat_template_counts_and_determinism(hf_generator):
    rendered = hf_generator.render(user("Where is Lyon?"))
    assert rendered.startswith("<s><|user|>\nWhere is Lyon?") and rendered.endswith("<|assistant|>\n")
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2)
    requests = [GenerationRequest(user("x " * k + "?"), params, key=f"r{k}") for k in (1, 9, 4, 6)]
    first = hf_generator.generate(requests)
    assert [len(c.texts) for c in first] == [2] * 4
    for request, completion in zip(requests, first):
        # a chat template writes its own BOS: the prompt is exactly the rendered template
        expected = len(hf_generator.tokenizer(hf_generator.render(request.messages),
                                              add_special_tokens=False)["input_ids"])
        assert completion.num_prompt_tokens == expected
        assert 2 <= completion.num_generated_tokens <= 16
    assert hf_generator.generate(requests) == first  # same seed, same batches: same answers
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    one = hf_generator.generate([GenerationRequest(user("x ?"), greedy, "g")])[0]
    # greedy with left padding inside a batch of longer prompts gives the same text
    batch = hf_generator.generate([GenerationRequest(user("x " * 9 + "?"), greedy, "h"),
                                   GenerationRequest(user("x ?"), greedy, "g")])
    assert batch[1].texts == one.texts


def test_hf_rope_override(tiny_hf):
    generator = build_generator(GeneratorConfig(backend="hf", model=tiny_hf, progress=False,
                                                rope_theta=1e6, max_model_len=8192))
    config = generator.model.config
    theta = (config.rope_parameters["rope_theta"] if isinstance(
        getattr(config, "rope_parameters", None), dict) else config.rope_theta)
    assert theta == 1e6
    assert config.max_position_embeddings == 8192


def test_hf_bad_model_dir(tmp_path):
    with pytest.raises(GenerationError, match="--model"):
        build_generator(GeneratorConfig(backend="hf", model=str(tmp_path / "missing"),
                                        tokenizer=None))


def test_missing_backends_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(GenerationError, match=r"pip install megatron-solopo\[vllm\]"):
        build_generator(GeneratorConfig(backend="vllm", model="m"))
    with pytest.raises(GenerationError, match="--backend 'tgi'"):
        build_generator(GeneratorConfig(backend="tgi", model="m"))


# ----------------------------------------------------------------------------------------------
# vLLM against a fake of its API
# ----------------------------------------------------------------------------------------------
class _FakeTokenizer:
    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<user>" + messages[-1]["content"] + "<assistant>"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def _fake_vllm(calls):
    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, n=1, temperature=1.0, top_p=1.0, max_tokens=16, seed=None):
            self.n, self.temperature, self.top_p = n, temperature, top_p
            self.max_tokens, self.seed = max_tokens, seed

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def get_tokenizer(self):
            return _FakeTokenizer()

        def generate(self, prompts, sampling_params, use_tqdm):
            calls.setdefault("generate", []).append((prompts, sampling_params))
            outputs = []
            for prompt, params in zip(prompts, sampling_params):
                text = "".join(map(chr, prompt["prompt_token_ids"]))
                # samples in reverse index order: the backend must sort them
                samples = [types.SimpleNamespace(index=i, text=f" {text}#{i}#{params.seed} ",
                                                 token_ids=[0] * (i + 1))
                           for i in reversed(range(params.n))]
                outputs.append(types.SimpleNamespace(outputs=samples))
            return outputs

    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def test_vllm_backend_against_fake(monkeypatch):
    calls = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    import megatron_solopo.generation.vllm as vllm_backend

    monkeypatch.setattr(vllm_backend, "_REQUESTS_PER_CALL", 2)
    generator = build_generator(GeneratorConfig(
        backend="vllm", model="/ckpt/m", tensor_parallel_size=8, max_model_len=131072,
        rope_theta=1e7, rope_scaling={"rope_type": "yarn", "factor": 4.0}, seed=3, progress=False))
    init = calls["init"]
    assert init["tensor_parallel_size"] == 8 and init["max_model_len"] == 131072
    assert init["hf_overrides"] == {"rope_theta": 1e7,
                                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    assert init["model"] == init["tokenizer"] == "/ckpt/m"
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, n=3)
    requests = [GenerationRequest(user(text), params, key=text) for text in ("aa", "b", "cccc")]
    completions = generator.generate(requests)
    for request, completion in zip(requests, completions):
        prompt = "<user>" + request.messages[-1]["content"] + "<assistant>"
        seed = request_seed(3, request.key)
        assert completion.texts == [f"{prompt}#{i}#{seed}" for i in range(3)]
        assert completion.num_prompt_tokens == len(prompt)
        assert completion.num_generated_tokens == 1 + 2 + 3
    # longest prompt first, at most 2 requests per call
    (first, first_params), (second, _) = calls["generate"]
    assert len(first) == 2 and len(second) == 1
    assert "".join(map(chr, first[0]["prompt_token_ids"])).startswith("<user>cccc")
    assert (first_params[0].temperature, first_params[0].top_p, first_params[0].max_tokens,
            first_params[0].n) == (0.7, 0.9, 5, 3)


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible server
# ----------------------------------------------------------------------------------------------
class _Server:
    """A chat-completions server on 127.0.0.1: answers '<content>#<i>' for each of n samples;
    the first ``fail_first`` POSTs get HTTP 503; ``status`` forces a status for every POST."""

    def __init__(self, fail_first=0, status=None, delay=0.0, ignore_n=False):
        self.bodies, self.lock = [], threading.Lock()
        self.fail_first, self.status, self.delay = fail_first, status, delay
        self.ignore_n = ignore_n
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "tiny"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append((body, self.headers.get("Authorization")))
                    fail = server.fail_first > 0 or server.status
                    server.fail_first -= 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                time.sleep(server.delay)
                with server.lock:
                    server.in_flight -= 1
                if fail:
                    return self._send(server.status or 503, {"error": "busy"})
                content = body["messages"][-1]["content"]
                n = 1 if server.ignore_n else body["n"]
                if server.ignore_n:
                    content = f"{content}@{body['seed']}"
                self._send(200, {"choices": [{"index": i, "message": {"role": "assistant",
                                                                      "content": f"{content}#{i}"}}
                                             for i in reversed(range(n))],
                                 "usage": {"prompt_tokens": 7, "completion_tokens": 3 * n}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _openai(url, **kwargs):
    from megatron_solopo.generation.openai import OpenAIGenerator

    config = GeneratorConfig(backend="openai", model="tiny", base_url=url, progress=False,
                             **kwargs)
    return OpenAIGenerator(config, backoff_seconds=0.01)


def test_openai_backend_n_samples_concurrency_and_retries(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    server = _Server(fail_first=2, delay=0.2)
    try:
        generator = _openai(server.url, concurrency=4, max_retries=3, seed=9)
        params = SamplingParams(temperature=0.85, top_p=0.95, max_new_tokens=12, n=3)
        requests = [GenerationRequest(user(f"q{i}"), params, key=f"k{i}") for i in range(8)]
        completions = generator.generate(requests)
    finally:
        server.close()
    assert [c.texts for c in completions] == [[f"q{i}#{j}" for j in range(3)] for i in range(8)]
    assert all(c.num_prompt_tokens == 7 and c.num_generated_tokens == 9 for c in completions)
    assert len(server.bodies) == 8 + 2  # two 503s retried
    body, auth = server.bodies[-1]
    assert auth == "Bearer secret"
    assert (body["model"], body["n"], body["temperature"], body["top_p"], body["max_tokens"]) == (
        "tiny", 3, 0.85, 0.95, 12)
    seeds = {b["messages"][-1]["content"]: b["seed"] for b, _ in server.bodies}
    assert seeds == {f"q{i}": request_seed(9, f"k{i}") for i in range(8)}
    assert server.max_in_flight > 1


def test_openai_server_without_n_is_asked_once_per_sample():
    server = _Server(ignore_n=True)
    try:
        generator = _openai(server.url, seed=1)
        [completion] = generator.generate([GenerationRequest(
            user("q"), SamplingParams(temperature=1.0, n=3), key="k")])
    finally:
        server.close()
    seeds = [request_seed(1, "k"), request_seed(1, "k#1"), request_seed(1, "k#2")]
    assert completion.texts == [f"q@{seed}#0" for seed in seeds]
    assert completion.num_generated_tokens == 9
    assert [body["n"] for body, _ in server.bodies] == [3, 1, 1]


def test_openai_errors_name_base_url():
    server = _Server(status=400)
    try:
        generator = _openai(server.url, max_retries=1)
        with pytest.raises(GenerationError, match=r"--base-url .* refused a request: HTTP 400"):
            generator.generate([GenerationRequest(user("q"), SamplingParams(), "k")])
        assert len(server.bodies) == 1  # a 400 is not retried
    finally:
        server.close()
    server = _Server(status=503)
    try:
        generator = _openai(server.url, max_retries=2)
        with pytest.raises(GenerationError, match=r"no answer .* --base-url .* after 3 attempts"):
            generator.generate([GenerationRequest(user("q"), SamplingParams(), "k")])
    finally:
        server.close()
    closed = server.url  # nothing listens there any more
    with pytest.raises(GenerationError, match=r"cannot reach .* --base-url http://127\.0\.0\.1"):
        _openai(closed)
    with pytest.raises(GenerationError, match="needs --base-url"):
        _openai(None)
    with pytest.raises(GenerationError, match="--rope-theta"):
        _openai("http://127.0.0.1:1/v1", rope_theta=1e7)

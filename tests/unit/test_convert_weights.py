"""Weight layouts against Megatron's own code: the fused QKV feeds megatron's query/key/value split
the heads Hugging Face computes, fc1 = [gate; up] gives the SwiGLU MLP, and the ShardedTensors we
write without a model are field for field those of a real GPTModel. Also the safetensors reader
and writer, and atomic outputs."""

import json

import pytest
import torch
import torch.nn.functional as F

from megatron_solopo.convert import weights as W
from megatron_solopo.convert.hf_io import (ShardedSafetensorsWriter, SafetensorsReader,
                                           atomic_output_dir, parse_size)
from megatron_solopo.convert.sharded import CanonicalChunk
from megatron_solopo.model.build import build_model
from megatron_solopo.model.config import ModelConfig, build_transformer_config
from megatron_solopo.parallel.distributed import (DistributedEnv, destroy_distributed,
                                                  initialize_distributed)
from megatron_solopo.parallel.layout import ParallelConfig
from tests.harness import free_port


@pytest.fixture(scope="module")
def single_process_megatron():
    initialize_distributed(ParallelConfig(), DistributedEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    yield
    destroy_distributed()


def tiny(**overrides) -> ModelConfig:
    fields = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                  num_query_groups=2, kv_channels=8, vocab_size=100, attention_backend="reference")
    return ModelConfig(**{**fields, **overrides})


def random_hf_tensors(model: ModelConfig, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in W.hf_shapes(model).items()}


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (4, 1)])
def test_fused_qkv_gives_megatron_the_heads_hugging_face_computes(single_process_megatron, heads,
                                                                   groups):
    model = tiny(num_attention_heads=heads, num_query_groups=groups, add_qkv_bias=True)
    (gpt,) = build_model(model, build_transformer_config(model, ParallelConfig()))
    attention = gpt.decoder.layers[0].self_attention
    hf = random_hf_tensors(model)
    base, d = "model.layers.0.self_attn.", model.kv_channels
    entry = W.CanonicalTensor(W.QKV_WEIGHT, 0, ())
    bias = W.CanonicalTensor(W.QKV_BIAS, 0, ())
    with torch.no_grad():
        attention.linear_qkv.weight.copy_(W.to_canonical(entry, [hf[n] for n in W.hf_sources(entry)], model))
        attention.linear_qkv.bias.copy_(W.to_canonical(bias, [hf[n] for n in W.hf_sources(bias)], model))
        x = torch.randn(5, 1, model.hidden_size)  # [s, b, h]
        query, key, value = attention.get_query_key_value_tensors(x)[:3]
        for name, ours, count in (("q", query, heads), ("k", key, groups), ("v", value, groups)):
            theirs = x @ hf[f"{base}{name}_proj.weight"].T + hf[f"{base}{name}_proj.bias"]
            torch.testing.assert_close(ours, theirs.view(5, 1, count, d), msg=name)


def test_fc1_is_gate_then_up(single_process_megatron):
    model = tiny()
    (gpt,) = build_model(model, build_transformer_config(model, ParallelConfig()))
    mlp = gpt.decoder.layers[0].mlp
    hf = random_hf_tensors(model)
    gate, up, down = (hf[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
    with torch.no_grad():
        mlp.linear_fc1.weight.copy_(W.to_canonical(W.CanonicalTensor(W.FC1, 0, ()), [gate, up], model))
        mlp.linear_fc2.weight.copy_(down)
        x = torch.randn(5, 1, model.hidden_size)
        ours = mlp(x)[0]
    torch.testing.assert_close(ours, (F.silu(x @ gate.T) * (x @ up.T)) @ down.T)


def _describe(state: dict) -> list:
    from megatron.core.dist_checkpointing.mapping import (ShardedObject, ShardedTensor,
                                                          apply_factories)
    from megatron_solopo.model.state import _leaves

    apply_factories(state)
    rows = []
    for leaf in _leaves(state):
        if isinstance(leaf, ShardedTensor):
            rows.append(("tensor", leaf.key, tuple(leaf.global_shape), tuple(leaf.global_offset),
                         tuple(leaf.axis_fragmentations), leaf.replica_id, leaf.prepend_axis_num,
                         tuple(leaf.local_shape), leaf.dtype, leaf.allow_shape_mismatch,
                         leaf.flattened_range))
        elif isinstance(leaf, ShardedObject):
            rows.append(("object", leaf.key, tuple(leaf.global_shape), tuple(leaf.global_offset),
                         leaf.replica_id, leaf.data))
        else:
            raise AssertionError(f"unexpected leaf {type(leaf)}")
    return sorted(rows, key=repr)


@pytest.mark.parametrize("overrides", [dict(), dict(untie_embeddings_and_output_weights=False),
                                       dict(add_qkv_bias=True, num_layers=3),
                                       dict(qk_layernorm=True, kv_channels=16)])
def test_model_less_shards_equal_a_real_models(single_process_megatron, overrides):
    model = tiny(**overrides)
    padded = model.padded_vocab_size(2)
    (gpt,) = build_model(model, build_transformer_config(model, ParallelConfig()),
                         padded_vocab_size=padded)
    tensors = {entry: [torch.zeros(entry.shape)] for entry in W.canonical_tensors(model, padded)}
    ours = _describe(CanonicalChunk(tensors, model.num_layers).sharded_state_dict())
    assert ours == _describe(gpt.sharded_state_dict())


@pytest.mark.parametrize("overrides", [dict(), dict(untie_embeddings_and_output_weights=False,
                                                    add_qkv_bias=True, num_query_groups=1),
                                       dict(qk_layernorm=True, kv_channels=16)])
def test_hf_to_canonical_and_back_is_exact(overrides):
    model = tiny(**overrides)
    hf = random_hf_tensors(model)
    back = {}
    for entry in W.canonical_tensors(model, model.padded_vocab_size(4)):
        canonical = W.to_canonical(entry, [hf[n] for n in W.hf_sources(entry)], model)
        assert tuple(canonical.shape) == entry.shape
        if entry.key in W.VOCAB_KEYS:
            assert not canonical[model.vocab_size:].any()  # zero padding rows
        back.update(W.from_canonical(entry, canonical, model))
    assert sorted(back) == sorted(hf)
    assert all(torch.equal(back[name], hf[name]) for name in hf)


def test_writer_shards_and_reader_reads_them(tmp_path):
    tensors = {f"t{i}": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each
    writer = ShardedSafetensorsWriter(tmp_path, max_bytes=900)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    assert writer.finish() == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000 and len(index["weight_map"]) == 5
    reader = SafetensorsReader(tmp_path)
    assert reader.names() == sorted(tensors) and reader.shape("t3") == (10, 10)
    assert all(torch.equal(reader.get(name), tensors[name]) for name in tensors)
    single = tmp_path / "single"
    single.mkdir()
    writer = ShardedSafetensorsWriter(single, max_bytes=10**6)
    writer.add("view", torch.arange(10.0)[:4])  # a view: only its own bytes are written
    assert writer.finish() == ["model.safetensors"]
    assert torch.equal(SafetensorsReader(single).get("view"), torch.arange(4.0))


def test_reader_refuses_a_directory_without_safetensors(tmp_path):
    with pytest.raises(ValueError, match="no model.safetensors"):
        SafetensorsReader(tmp_path)


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 << 30),
                                       ("150KB", 150_000), ("1234", 1234), (77, 77)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_refuses_nonsense():
    with pytest.raises(ValueError, match="--max-shard-size"):
        parse_size("big")


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "done").write_text("x")
    assert (tmp_path / "out" / "done").exists() and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        with atomic_output_dir(tmp_path / "out"):
            pass

"""Run config: YAML + dotted overrides, validation messages, dry-run planner."""

import pytest

from megatron_solopo.config import apply_overrides, config_from_dict, load_config, reference_mode
from megatron_solopo.training.planner import dry_run


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "training:\n  train_iters: 7\nobjective:\n  name: longpo\n  beta: 0.2\n")
    config = load_config(path, ("training.global_batch_size=16", "objective.lambda=0.5",
                                "model.rotary_base=1e7", "parallel.sequence_parallel=true"))
    assert config.training.train_iters == 7 and config.training.global_batch_size == 16
    assert config.objective == {"name": "longpo", "beta": 0.2, "lambda": 0.5}
    assert config.model.rotary_base == 1e7 and isinstance(config.model.rotary_base, float)
    assert config.parallel.sequence_parallel is True
    assert config.explicit_model_fields == ["rotary_base"]
    assert reference_mode(config) == "precomputed"


def test_defaults_are_solopo_dpo_with_precomputed_reference():
    config = config_from_dict({})
    assert config.objective == {"name": "solopo", "base": "dpo"}
    assert reference_mode(config) == "precomputed"
    assert reference_mode(config_from_dict({"objective": {"name": "simpo"}})) == "none"


@pytest.mark.parametrize("raw,message", [
    ({"trianing": {}}, "unknown config section(s) ['trianing']"),
    ({"training": {"train_itres": 3}}, "unknown field(s) training.train_itres; valid fields of training"),
    ({"training": {"train_iters": "ten"}}, "training.train_iters='ten' should be of type int"),
    ({"training": {"train_iters": 0}}, "training.train_iters must be >= 1"),
    ({"parallel": {"cp_comm_type": "ring"}}, "parallel.cp_comm_type='ring' is not one of"),
    ({"objective": {"name": "dpx"}}, "unknown objective 'dpx'"),
    ({"objective": {"name": "dpo"}, "reference": {"mode": "none"}}, "needs reference log-probs"),
    ({"optimizer": {"learning_rate": 1.0}}, "unknown optimizer field(s) ['learning_rate']"),
    ({"ddp": {"overlap": True}}, "unknown ddp field(s) ['overlap']"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr='fast' should be of type float"),
    ({"ddp": {"bucket_size": 2.5}}, "ddp.bucket_size=2.5 should be of type int"),
    ({"model": {"family": "gpt2"}}, "model.family='gpt2'"),
    ({"model": {"rope_scaling": {"type": "yarn", "factor": 4}}}, "RoPE scaling type 'yarn' is not supported"),
])
def test_invalid_configs_are_named(raw, message):
    with pytest.raises(ValueError) as err:
        config_from_dict(raw)
    assert message in str(err.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    path = write(tmp_path, "training: [1, 2\n")
    with pytest.raises(ValueError, match="run.yaml: invalid YAML"):
        load_config(path)
    with pytest.raises(ValueError, match="must be section.field"):
        load_config(None, ("train_iters=3",))


def test_megatron_sections_are_coerced_like_ours(tmp_path):
    """optimizer/ddp/transformer_overrides values from YAML or overrides ("1e-3" is a string to
    YAML 1.1) reach Megatron-Core's dataclasses with their declared types."""
    from megatron_solopo.model.config import build_transformer_config
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training.optimizer import ddp_config, optimizer_config

    path = write(tmp_path, "optimizer:\n  lr: 1e-3\n  weight_decay: 0\nddp:\n  bucket_size: 4e7\n")
    config = load_config(path, ("optimizer.min_lr=1e-5", "model.vocab_size=128",
                                "model.transformer_overrides.attention_dropout=1e-1",
                                "model.transformer_overrides.recompute_num_layers=1.0"))
    opt = optimizer_config(config)
    assert (opt.lr, opt.min_lr, opt.weight_decay) == (1e-3, 1e-5, 0.0)
    assert isinstance(opt.weight_decay, float)
    assert ddp_config(config).bucket_size == 40_000_000
    transformer = build_transformer_config(config.model, ParallelConfig(),
                                           perform_initialization=False)
    assert transformer.attention_dropout == 0.1 and transformer.recompute_num_layers == 1
    assert isinstance(transformer.recompute_num_layers, int)


def test_override_creates_nested_sections():
    raw = apply_overrides({}, ["model.transformer_overrides.recompute_granularity=full"])
    assert raw == {"model": {"transformer_overrides": {"recompute_granularity": "full"}}}


def test_dry_run_reports_layout_parameters_and_memory():
    config = config_from_dict({
        "model": {"num_layers": 32, "hidden_size": 4096, "ffn_hidden_size": 14336,
                  "num_attention_heads": 32, "num_query_groups": 8, "vocab_size": 128256,
                  "rope_scaling": {"type": "llama3", "factor": 8.0}},
        "parallel": {"tensor_model_parallel_size": 4, "context_parallel_size": 2,
                     "sequence_parallel": True},
        "precision": {"bf16": True},
        "optimizer": {"use_distributed_optimizer": True, "lr": 1e-6},
        "data": {"max_tokens_per_micro_batch": 65536}})
    report = dry_run(config, world_size=16)
    assert "TP=4 CP=2 PP=1 DP=2" in report
    assert "8,030,261,248 total" in report  # Llama-3.1-8B
    assert "total" in report and "GiB" in report


def test_dry_run_rejects_a_bad_layout_before_anything_starts():
    config = config_from_dict({"model": {"vocab_size": 1000},
                               "parallel": {"tensor_model_parallel_size": 3}})
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by TP=3"):
        dry_run(config, world_size=3)


@pytest.mark.parametrize("path", sorted(str(p) for p in
                                        __import__("pathlib").Path(__file__).resolve().parents[2]
                                        .joinpath("examples").glob("*.yaml")))
def test_example_configs_load_and_plan(path):
    # Production examples take the architecture from their (converted) starting checkpoint.
    architecture = () if "demo" in path else (
        "model.num_layers=32", "model.hidden_size=4096", "model.ffn_hidden_size=14336",
        "model.num_attention_heads=32", "model.num_query_groups=8")
    config = load_config(path, ("model.vocab_size=32000",) + architecture)
    world = (config.parallel.tensor_model_parallel_size * config.parallel.context_parallel_size
             * config.parallel.pipeline_model_parallel_size)
    assert "total" in dry_run(config, world_size=world)

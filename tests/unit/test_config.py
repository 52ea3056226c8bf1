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
    # the examples' "precomputed"/"live" is moot for a reference-free objective
    for mode in ("precomputed", "live"):
        assert reference_mode(config_from_dict({"objective": {"name": "solopo", "base": "simpo"},
                                                "reference": {"mode": mode}})) == "none"
    assert reference_mode(config_from_dict({"objective": {"name": "sft"},
                                            "reference": {"mode": "live"}})) == "none"


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
    ({"training": {"train_iters": 2}, "scheduler": {"lr_warmup_iters": 3}},
     "scheduler warm-up (3 steps) must be shorter than the decay (2 steps"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr='fast' should be of type float"),
    ({"ddp": {"bucket_size": 2.5}}, "ddp.bucket_size=2.5 should be of type int"),
    ({"model": {"family": "gpt2"}}, "model.family='gpt2'"),
    ({"model": {"rope_scaling": {"type": "dynamic", "factor": 4}}}, "RoPE scaling type 'dynamic' is not supported"),
    ({"model": {"rope_scaling": {"type": "yarn", "factor": 4}}}, "needs a positive 'original_max_position_embeddings'"),
    ({"model": {"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 8,
                                 "beta": 2}}}, "unknown keys ['beta']"),
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


def fake_checkpoint(root, model: dict):
    """What the dry-run reads from a starting checkpoint: tracker + run_config.yaml."""
    import yaml

    from megatron_solopo.training import checkpoint as ckpt

    (root / "release").mkdir(parents=True)
    (root / ckpt.TRACKER_FILE).write_text("release\n")
    (root / "release" / "metadata.json").write_text("{}")
    (root / "release" / ckpt.RUN_CONFIG_FILE).write_text(yaml.safe_dump({"model": model}))
    return root


MISTRAL_7B = dict(family="mistral", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                  num_attention_heads=32, num_query_groups=8, vocab_size=32768)


@pytest.mark.parametrize("path", sorted(str(p) for p in
                                        __import__("pathlib").Path(__file__).resolve().parents[2]
                                        .joinpath("examples").glob("*.yaml")))
def test_example_configs_load_and_plan(path, tmp_path):
    # Production examples take the architecture from their (converted) starting checkpoint.
    overrides = ("model.vocab_size=32000",) if "demo" in path else (
        f"checkpoint.load={fake_checkpoint(tmp_path / 'ckpt', MISTRAL_7B)}",)
    config = load_config(path, overrides)
    world = (config.parallel.tensor_model_parallel_size * config.parallel.context_parallel_size
             * config.parallel.pipeline_model_parallel_size)
    report = dry_run(config, world_size=world)
    if "demo" not in path:
        assert "32 layers, hidden 4096" in report
    assert "total" in report


def test_dry_run_refuses_a_missing_starting_checkpoint(tmp_path):
    """Not a silent plan of the default toy model."""
    config = load_config(None, (f"checkpoint.load={tmp_path / 'nope'}",))
    with pytest.raises(ValueError, match="checkpoint.load=.*nope: no checkpoint there"):
        dry_run(config, world_size=1)


def test_model_fields_that_change_shapes_conflict_with_the_checkpoint(tmp_path):
    root = fake_checkpoint(tmp_path / "ckpt", MISTRAL_7B)
    report = dry_run(load_config(None, (f"checkpoint.load={root}", "model.rotary_base=1e6")), 8)
    assert "32 layers" in report  # a RoPE change is fine
    with pytest.raises(ValueError, match=r"model.num_layers=16 \(checkpoint: 32\)"):
        dry_run(load_config(None, (f"checkpoint.load={root}", "model.num_layers=16")), 8)


def test_layout_and_batch_checks_of_the_interleaved_schedule(tmp_path):
    root = fake_checkpoint(tmp_path / "ckpt", MISTRAL_7B)
    base = (f"checkpoint.load={root}", "parallel.pipeline_model_parallel_size=4",
            "data.fixed_length_micro_batches=true")
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size must be >= 2"):
        dry_run(load_config(None, base + ("parallel.virtual_pipeline_model_parallel_size=1",)), 8)
    with pytest.raises(ValueError, match="needs at least PP=4 micro-batches per step"):
        dry_run(load_config(None, base + ("parallel.virtual_pipeline_model_parallel_size=2",
                                          "training.global_batch_size=2")), 8)
    assert "PP=4" in dry_run(load_config(None, base + (
        "parallel.virtual_pipeline_model_parallel_size=2", "training.global_batch_size=16")), 8)
    with pytest.raises(ValueError, match="--world-size must be >= 1"):
        dry_run(load_config(None, base), 0)


def test_reference_checkpoint_is_never_the_run_s_own_save_directory(tmp_path):
    from megatron_solopo.config import reference_checkpoint

    def ref(**checkpoint):
        return reference_checkpoint(config_from_dict({"checkpoint": checkpoint}))

    assert ref(load="/ckpt/init", save="/ckpt/run") == "/ckpt/init"
    assert ref(load=str(tmp_path / "run"), save=str(tmp_path / "run" / ".")) is None
    assert ref() is None
    explicit = config_from_dict({"checkpoint": {"load": "/r", "save": "/r"},
                                 "reference": {"checkpoint": "/ckpt/init"}})
    assert reference_checkpoint(explicit) == "/ckpt/init"

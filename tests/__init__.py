import megatron_solopo  # noqa: F401  (registers the triton stub before any megatron import)

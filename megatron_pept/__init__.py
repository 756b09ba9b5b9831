"""megatron_pept: parameter-efficient pre-training of LLaMA-style models at scale."""

__version__ = "0.1.0"

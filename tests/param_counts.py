"""Parameter counts of a LLaMA written out from its shapes, independent of the model and method code: the reference
the parameter-count tests compare with (itself checked against transformers' LlamaForCausalLM in test_model.py).

    from param_counts import adapter_params, llama_params, lowrank_trainable

``shape`` is a model's hidden_size, num_layers, num_heads, num_kv_heads and intermediate_size (as in MODEL_SHAPES).
"""

from __future__ import annotations


def projections(*, hidden_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> list[tuple]:
    """(out, in) of each linear layer of one decoder layer: q, k, v, o, then gate, up, down (no biases)."""
    h, kv_width = hidden_size, num_kv_heads * (hidden_size // num_heads)  # k and v: kv heads x head_dim outputs
    attention = [(h, h), (kv_width, h), (kv_width, h), (h, h)]
    return [*attention, (intermediate_size, h), (intermediate_size, h), (h, intermediate_size)]


def llama_params(*, vocab: int, tied: bool, num_layers: int, **shape: int) -> int:
    """Every parameter: the embedding (V x d), per layer the 4 attention and 3 MLP matrices and 2 RMSNorms, the final
    norm, and the LM head (d x V) unless it is tied to the embedding."""
    h = shape["hidden_size"]
    matrices = sum(out * inp for out, inp in projections(**shape))
    embeddings = vocab * h if tied else 2 * vocab * h
    return embeddings + num_layers * (matrices + 2 * h) + h


def adapter_params(*, rank: int, num_layers: int, **shape: int) -> int:
    """The adapters of a LoRA-style method on every projection: A (r x in) and B (out x r) for each out x in matrix."""
    return num_layers * sum(rank * (out + inp) for out, inp in projections(**shape))


def lowrank_trainable(*, vocab: int, rank: int, tied: bool = False, num_layers: int, **shape: int) -> int:
    """What such a run trains: the adapters instead of the projections; the embedding, LM head and norms in full."""
    frozen = num_layers * sum(out * inp for out, inp in projections(**shape))
    dense = llama_params(vocab=vocab, tied=tied, num_layers=num_layers, **shape)
    return dense - frozen + adapter_params(rank=rank, num_layers=num_layers, **shape)

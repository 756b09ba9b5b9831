"""Our LLaMA against transformers' LlamaForCausalLM with the same weights, plus model invariants."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers
from param_counts import llama_params

from megatron_pept.config import ModelConfig
from megatron_pept.errors import ConfigError
from megatron_pept.models import MODEL_SHAPES, build_model, llama_args
from megatron_pept.models.hf import to_hf_model
from megatron_pept.models.llama import LlamaArgs, LlamaForCausalLM


def make_model(args: LlamaArgs, seed: int = 0) -> LlamaForCausalLM:
    model = build_model(args)
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.eval()


def hf_twin(model: LlamaForCausalLM) -> transformers.LlamaForCausalLM:
    return to_hf_model(model, attn_implementation="eager").eval()


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,tie,theta",
    [(4, 4, False, 10000.0), (4, 2, False, 500000.0), (8, 2, True, 10000.0)],
    ids=["mha", "gqa", "gqa-tied"],
)
def test_logits_equal_transformers(num_heads: int, num_kv_heads: int, tie: bool, theta: float) -> None:
    args = LlamaArgs(
        vocab_size=257,
        hidden_size=64,
        num_layers=2,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=176,
        max_seq_len=64,
        rope_theta=theta,
        norm_eps=1e-6,
        tie_embeddings=tie,
    )
    model = make_model(args)
    hf = hf_twin(model)
    assert isinstance(hf, transformers.LlamaForCausalLM)
    ids = torch.randint(0, args.vocab_size, (3, 48))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (3, 48, args.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_rope_theta_matters() -> None:
    """The equality above is not vacuous: a different rotary base gives different logits."""
    base = dict(vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4, intermediate_size=64)
    a = make_model(LlamaArgs(**base, rope_theta=10000.0))
    b = make_model(LlamaArgs(**base, rope_theta=100.0))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 64, (1, 32))
    with torch.no_grad():
        assert (a(ids) - b(ids)).abs().max() > 1e-4


def test_meta_build_allocates_nothing_and_init_is_seeded() -> None:
    args = llama_args(ModelConfig(name="debug"), vocab_size=100, max_seq_len=32)
    meta = build_model(args)
    assert all(p.is_meta for p in meta.parameters())
    a, b, c = make_model(args, seed=1), make_model(args, seed=1), make_model(args, seed=2)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_init_statistics() -> None:
    args = LlamaArgs(vocab_size=512, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=4, intermediate_size=512)
    model = make_model(args)
    layer = model.model.layers["0"]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4.0, rel=0.05)  # / sqrt(2 * 8)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))


def test_tied_embeddings_share_storage_after_materialisation() -> None:
    args = llama_args(ModelConfig(name="debug", tie_embeddings=True), vocab_size=100, max_seq_len=16)
    model = make_model(args)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in model.state_dict()
    shape = MODEL_SHAPES["debug"]
    expected = llama_params(vocab=100, tied=True, **shape)
    assert sum(p.numel() for p in model.parameters()) == args.num_params() == expected


# The papers' names of these sizes (ReLoRA Table 1: 60M, 130M, 250M, 350M, 1.3B; LLaMA (Touvron et al., 2023)
# Table 2: 6.7B for its 7B) are names, not exact counts. With a 32,000 vocabulary and untied embeddings ours have
# 58.1M (-3.2%), 134.1M (+3.2%), 247.4M (-1.1%), 368.0M (+5.1%), 1339.1M (+3.0%) and 6738.4M (+0.6%).
PAPER_SIZE_NAMES_M = {"60m": 60, "130m": 130, "250m": 250, "350m": 350, "1b": 1300, "7b": 6700}


def hf_params(*, vocab: int, tied: bool, **shape: int) -> int:
    """The parameter count of transformers' LlamaForCausalLM of that shape (built on the meta device)."""
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        intermediate_size=shape["intermediate_size"],
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())  # tied: one tensor, counted once


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_the_count_from_the_shapes_is_transformers_count(name: str, tied: bool) -> None:
    """The reference the counts below are compared with (tests/param_counts.py) counts what transformers builds."""
    shape = MODEL_SHAPES[name]
    assert llama_params(vocab=32000, tied=tied, **shape) == hf_params(vocab=32000, tied=tied, **shape)


@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_named_sizes_parameter_counts(name: str) -> None:
    args = llama_args(ModelConfig(name=name), vocab_size=32000)
    expected = llama_params(vocab=32000, tied=False, **MODEL_SHAPES[name])
    assert sum(p.numel() for p in build_model(args).parameters()) == expected
    assert args.num_params() == expected
    if name in PAPER_SIZE_NAMES_M:
        assert expected / 1e6 == pytest.approx(PAPER_SIZE_NAMES_M[name], rel=0.06)


def test_overrides_and_shape_errors() -> None:
    args = llama_args(ModelConfig(name="debug", hidden_size=96, num_heads=6), vocab_size=10)
    assert (args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim) == (96, 6, 6, 16)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        llama_args(ModelConfig(name="debug", num_heads=5), vocab_size=10)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        llama_args(ModelConfig(name="debug", num_kv_heads=3), vocab_size=10)


def test_sequence_longer_than_rope_table_is_refused() -> None:
    model = make_model(llama_args(ModelConfig(name="debug"), vocab_size=10, max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("backend,package", [("flash", "flash-attn"), ("te", "transformer-engine")])
def test_missing_gpu_attention_backend_names_the_extra(backend: str, package: str) -> None:
    try:
        __import__("flash_attn" if backend == "flash" else "transformer_engine.pytorch")
    except Exception:
        pass
    else:
        pytest.skip(f"{package} is installed")
    with pytest.raises(ConfigError, match=r"megatron_pept\[gpu\]"):
        build_model(llama_args(ModelConfig(name="debug", attention=backend), vocab_size=10))


def test_flops_per_token_matches_6n_rule() -> None:
    args = llama_args(ModelConfig(name="60m"), vocab_size=32000)
    matmul = args.num_params(include_embedding=False) - (2 * args.num_layers + 1) * args.hidden_size
    assert args.flops_per_token(256) == 6 * matmul + 12 * args.num_layers * args.hidden_size * 256


CASTS = {
    "module.bfloat16()": (lambda m: m.bfloat16(), torch.bfloat16),  # what DeepSpeed's bf16 mode does
    "module.half()": (lambda m: m.half(), torch.float16),
    "module.to(bfloat16)": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "module.to(dtype=float16)": (lambda m: m.to(dtype=torch.float16), torch.float16),
}


@pytest.mark.parametrize("cast", list(CASTS))
def test_rope_tables_stay_fp32_whatever_cast_the_module_gets(cast: str) -> None:
    """A backend's cast of the whole module (DeepSpeed's bf16 mode calls module.bfloat16()) casts the weights but
    not the rotary tables: the cast model computes exactly what a model computes whose parameters alone were cast
    (tables as computed, fp32). Rounded to bf16, cos/sin would be off by up to 2^-9 at every position, and the
    rotation angle of a position past 256 cannot even be told from its neighbours'."""
    fn, dtype = CASTS[cast]
    args = llama_args(ModelConfig(name="debug"), vocab_size=97, max_seq_len=320)
    model, reference = make_model(args), make_model(args)
    fn(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.data = p.data.to(dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    for name in ("rope_cos", "rope_sin"):
        table = getattr(model.model, name)
        assert table.dtype == torch.float32, name
        assert torch.equal(table, getattr(reference.model, name)), name
    ids = torch.randint(0, args.vocab_size, (1, 320), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


# -- initialisation from a seed of its own per weight (megatron_pept.models.init) ---------------------------------

ARGS = LlamaArgs(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176)


def test_any_split_of_a_weights_rows_draws_exactly_the_rows_of_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_pept import seeded
    from megatron_pept.models import init

    monkeypatch.setattr(seeded, "BLOCK_NUMEL", 3 * 64)  # 3 rows a block: shards begin and end inside blocks
    shape = (29, 64)
    whole = torch.empty(shape)
    init.fill_normal_rows_(whole, start=0, shape=shape, name="w", seed=5, std=0.02)
    for world in (2, 3, 5, 29):
        pieces = []
        for chunk in torch.arange(shape[0]).chunk(world):  # FSDP2's row shards
            piece = torch.empty(len(chunk), shape[1])
            init.fill_normal_rows_(piece, start=int(chunk[0]), shape=shape, name="w", seed=5, std=0.02)
            pieces.append(piece)
        assert torch.equal(torch.cat(pieces), whole), world
    bf16 = torch.empty(shape, dtype=torch.bfloat16)  # stored in the weight's dtype: the fp32 draws rounded once
    init.fill_normal_rows_(bf16, start=0, shape=shape, name="w", seed=5, std=0.02)
    assert torch.equal(bf16, whole.bfloat16())


def test_each_weight_has_a_seed_of_its_own_from_its_name_and_the_run_seed() -> None:
    plain = build_model(ARGS, device="meta")
    plain.to_empty(device="cpu")
    plain.init_weights(seed=3)
    weights = dict(plain.initial_weights())
    # The same name and seed, whatever else the model holds: a model with one layer fewer starts with the same
    # embedding and first layer.
    shorter = build_model(dataclasses.replace(ARGS, num_layers=1), device="meta")
    shorter.to_empty(device="cpu")
    shorter.init_weights(seed=3)
    for name, value in shorter.named_parameters():
        if not name.startswith("lm_head") and "down_proj" not in name and "o_proj" not in name:
            assert torch.equal(value, weights[name]), name  # (the residual projections' std depends on the depth)
    again = build_model(ARGS, device="meta")
    again.to_empty(device="cpu")
    again.init_weights(seed=4)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(weights[q], dict(again.initial_weights())[q])  # another seed, other values
    assert not torch.equal(weights[q], weights[k])  # same shape, another name


def test_initial_values_keep_the_init_std_and_the_scaled_residual_std() -> None:
    args = dataclasses.replace(ARGS, num_layers=4, hidden_size=128, intermediate_size=256, init_std=0.05)
    model = build_model(args, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    out_std = 0.05 / math.sqrt(2 * 4)
    for name, value in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(value, torch.ones_like(value)), name
            continue
        want = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.05
        # >= 16k draws each: the sample std is within 3% of the true one (about 5 standard errors)
        assert abs(float(value.std()) / want - 1) < 0.03, (name, float(value.std()), want)
        assert abs(float(value.mean())) < 0.05 * want, name

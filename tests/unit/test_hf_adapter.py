"""The one Hugging Face adapter (models/hf.py: to_hf / from_hf): exactly the parameters of transformers'
LlamaForCausalLM cross, never an attention kernel's state; transformer-engine's attention saves and loads weights
only (a stand-in of the shape of TE's DotProductAttention, which keeps a pickled ``_extra_state``); a checkpoint whose
metadata says the run trained with ``te`` or ``flash`` exports on a machine without either package, and transformers
computes what our model computed."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from poisoned import Command
from test_trainer import tiny
from torch import nn

from megatron_pept.errors import ConfigError
from megatron_pept.models import build_model
from megatron_pept.models.hf import from_hf, hf_state_shapes, to_hf, to_hf_model
from megatron_pept.models.llama import LlamaArgs
from megatron_pept.trainer import Trainer

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))


def make(attention: str = "sdpa", *, tie: bool = False, seed: int = 0, **shape: int) -> nn.Module:
    args = LlamaArgs(**{**SHAPE, **shape}, max_seq_len=32, tie_embeddings=tie, attention=attention)
    model = build_model(args, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.eval()


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def pickled(value: object) -> torch.Tensor:
    """``value`` as transformer-engine saves its extra state: the bytes of a pickle in a uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)


class StandInDotProductAttention(nn.Module):
    """transformer-engine's ``DotProductAttention`` as this stack uses it: causal attention of ``[b, s, h, d]``
    query and fewer key/value heads (bshd), output ``[b, s, h * d]``. Like every TE module since TE 1.8 it saves its
    FP8 metadata as extra state (a pickle in a uint8 tensor) and unpickles what it is given back."""

    unpickled: list[object] = []  # what set_extra_state read, by any instance

    def __init__(self, num_attention_heads: int, kv_channels: int, **kwargs: object) -> None:
        super().__init__()
        assert kwargs["attn_mask_type"] == "causal" and kwargs["qkv_format"] == "bshd", kwargs
        self.gqa = kwargs["num_gqa_groups"] != num_attention_heads
        self.fp8_meta = {"recipe": None, "amax_history": [0.0]}

    def forward(self, q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor) -> torch.Tensor:
        b, s = q_bshd.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q_bshd, k_bshd, v_bshd))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        return out.transpose(1, 2).reshape(b, s, -1)

    def get_extra_state(self) -> torch.Tensor:
        return pickled(self.fp8_meta)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.fp8_meta = pickle.loads(state.numpy().tobytes())  # what TE does with a checkpoint's bytes
        self.unpickled.append(self.fp8_meta)


@pytest.fixture
def fake_te(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """``transformer_engine.pytorch`` here (a CPU machine where it cannot be installed) is a module whose
    ``DotProductAttention`` is the stand-in; returns the list of what its instances unpickled."""
    package, module = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.pytorch")
    module.DotProductAttention = StandInDotProductAttention
    package.pytorch = module
    monkeypatch.setitem(sys.modules, "transformer_engine", package)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", module)
    StandInDotProductAttention.unpickled = []
    return StandInDotProductAttention.unpickled


def kernel_keys(state: dict) -> list[str]:
    return [key for key in state if key.endswith("_extra_state")]


# -- to_hf: exactly transformers' state dict -------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_to_hf_gives_the_state_dict_and_config_of_transformers_llama(tie: bool) -> None:
    """The keys and shapes are those of transformers' own model built from the config to_hf gives (tied: the
    embedding's tensor is also lm_head.weight, as transformers lists it); it loads them strictly and computes
    our logits."""
    model = make(tie=tie)
    config, state = to_hf(model.args, model.state_dict())
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation="eager")).eval()
    theirs = {key: tuple(value.shape) for key, value in hf.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in state.items()} == theirs == hf_state_shapes(model.args)
    if tie:
        assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    torch.testing.assert_close(logits(hf), logits(model), atol=1e-5, rtol=1e-5)


def test_to_hf_drops_a_kernels_extra_state_and_refuses_a_methods_tensor() -> None:
    """A core attention module that keeps extra state, placed in our model as it is (no wrapper), puts
    ``..._extra_state`` into the model's state dict; to_hf leaves it out, so transformers' twin loads strictly and
    computes our logits. A tensor no plain LLaMA has (an adapter not merged) is refused in one line."""
    model = make()
    for layer in model.model.layers.values():
        layer.self_attn.core = StandInDotProductAttention(
            4, 16, num_gqa_groups=2, attn_mask_type="causal", qkv_format="bshd", attention_dropout=0.0
        )
    state = model.state_dict()
    assert kernel_keys(state) == [f"model.layers.{i}.self_attn.core._extra_state" for i in range(2)]
    _, hf_state = to_hf(model.args, state)
    assert not kernel_keys(hf_state) and hf_state.keys() == hf_state_shapes(model.args).keys()
    torch.testing.assert_close(
        logits(to_hf_model(model, attn_implementation="eager")), logits(model), atol=1e-5, rtol=1e-5
    )

    adapter = {**state, "model.layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 64)}
    with pytest.raises(ValueError, match=r"holds model.layers.0.self_attn.q_proj.lora_A .* plain LLaMA has not"):
        to_hf(model.args, adapter)


# -- transformer-engine's attention keeps weights only ----------------------------------------------------------------


def test_te_attention_saves_no_extra_state_and_loads_strictly_without_unpickling(fake_te, tmp_path: Path) -> None:
    """The stand-in saves extra state as TE's module does; our ``te`` model's state dict holds the weights of the
    ``sdpa`` model and nothing else, both load each other's state strictly, and a state dict that still carries TE's
    pickle (as this stack's checkpoints of a te run did) loads without it being unpickled: here the pickle would
    create a file."""
    te, sdpa = make("te"), make("sdpa")
    inner = te.model.layers["0"].self_attn.core.inner
    assert isinstance(inner, StandInDotProductAttention) and kernel_keys(inner.state_dict()) == ["_extra_state"]
    state = te.state_dict()
    assert not kernel_keys(state) and list(state) == list(sdpa.state_dict())
    assert all(torch.equal(value, sdpa.state_dict()[key]) for key, value in state.items())
    torch.testing.assert_close(logits(te), logits(sdpa), atol=1e-6, rtol=1e-6)

    other = make("sdpa", seed=1)
    te.load_state_dict(other.state_dict(), strict=True)
    result = te.load_state_dict(other.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(logits(te), logits(other), atol=1e-6, rtol=1e-6)
    sdpa.load_state_dict(te.state_dict(), strict=True)

    marker = tmp_path / "unpickled"
    poisoned = {
        f"model.layers.{i}.self_attn.core.inner._extra_state": pickled(Command(f"touch {marker}")) for i in (0, 1)
    }
    te.load_state_dict({**other.state_dict(), **poisoned}, strict=True)
    assert fake_te == [] and not marker.exists()
    torch.testing.assert_close(logits(te), logits(other), atol=1e-6, rtol=1e-6)


def test_te_model_goes_to_transformers_and_back(fake_te, tmp_path: Path) -> None:
    """A ``te`` model's twin in transformers computes its logits; saved as a Hugging Face folder, it loads into a
    fresh ``te`` model through from_hf (model.init_from's path) and that model computes the same logits again."""
    from megatron_pept.models.hf_import import load_hf_weights

    te = make("te", seed=3)
    hf = to_hf_model(te, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(hf), logits(te), atol=1e-5, rtol=1e-5)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    fresh = make("te", seed=4)
    assert load_hf_weights(fresh, tmp_path / "hf") == len(hf_state_shapes(fresh.args))
    torch.testing.assert_close(logits(fresh), logits(te), atol=1e-6, rtol=1e-6)
    assert fake_te == []


# -- from_hf: the config checked, our names yielded -------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_from_hf_yields_every_parameter_of_ours_from_transformers_weights(tie: bool) -> None:
    model = make(tie=tie)
    config, state = to_hf(model.args, model.state_dict())
    got = dict(from_hf(config, state, model.args, where="here"))
    ours = dict(model.named_parameters())  # tied: the embedding once, under its name
    assert got.keys() == ours.keys()
    assert all(torch.equal(got[name], value) for name, value in ours.items())


def test_from_hf_refuses_another_model_a_missing_weight_and_a_wrong_shape_in_one_line() -> None:
    model = make()
    config, state = to_hf(model.args, model.state_dict())
    other = make(num_layers=1).args

    def refused(match: str, config: dict = config, state: dict = state, args: LlamaArgs = model.args) -> None:
        with pytest.raises(ConfigError, match=match) as err:
            dict(from_hf(config, state, args, where="model.init_from=F"))
        assert "\n" not in str(err.value)

    refused(
        r"^model.init_from=F is not the model this run builds \(model.num_layers=1\); set model.num_layers=2$",
        args=other,
    )
    scaled = {**config, "rope_scaling": {"rope_type": "linear"}}
    refused(r"^model.init_from=F uses RoPE scaling \(.*linear.*\)", config=scaled)
    refused(
        r"^model.init_from=F: config.json has no hidden_size",
        config={k: v for k, v in config.items() if k != "hidden_size"},
    )
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    refused(r"^model.init_from=F has no tensor model.norm.weight \(of 1 missing\)$", state=missing)
    wrong = {**state, "model.norm.weight": torch.ones(63)}
    refused(r"^model.init_from=F: model.norm.weight has shape \[63\], this model \[64\]$", state=wrong)


# -- a te or flash run exports where neither is installed ------------------------------------------------------------


@pytest.fixture(scope="module")
def relora_run(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A short ReLoRA run (trained with sdpa, here on CPU) and its model's logits on the first ids."""
    run = tmp_path_factory.mktemp("kernel") / "run"
    overrides = [
        "method.name=relora",
        "method.rank=4",
        "method.reset_every=2",
        "train.steps=3",
        "checkpoint.interval=3",
    ]
    trainer = Trainer(tiny(quickstart_data, run, *overrides))
    trainer.train()
    return run, logits(trainer.raw_model.eval(), IDS[:, :12])


def as_if_trained_with(run: Path, to: Path, kernel: str, *, marker: Path) -> Path:
    """A copy of the run whose checkpoint says it trained with ``kernel`` in bf16 on CUDA (meta.json's model
    arguments and config); for ``te`` its DCP state also holds, per layer, the ``_extra_state`` TE's attention put
    into checkpoints before this fix: a pickle that creates ``marker`` when unpickled."""
    import torch.distributed.checkpoint as dcp

    from megatron_pept.checkpoint import store
    from megatron_pept.checkpoint.export import load_full_tensors

    shutil.copytree(run, to)
    (checkpoint,) = (to / "checkpoints").glob("step_*")
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["model_args"]["attention"] = meta["config"]["model"]["attention"] = kernel
    meta["config"]["train"] |= {"dtype": "bf16", "device": "cuda"}
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    if kernel == "te":
        state = load_full_tensors(checkpoint, prefix="")
        for i in range(meta["model_args"]["num_layers"]):
            state[f"model.model.layers.{i}.self_attn.core.inner._extra_state"] = pickled(Command(f"touch {marker}"))
        shutil.rmtree(checkpoint / "state")
        dcp.save(state, checkpoint_id=checkpoint / "state", no_dist=True)
    (checkpoint / store.MARKER).unlink()
    store.write_marker(checkpoint)
    return to


@pytest.mark.parametrize("kernel", ["te", "flash"])
def test_a_checkpoint_of_a_te_or_flash_run_exports_on_a_machine_without_them(
    kernel: str, relora_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither transformer-engine nor flash-attn can be imported here (made sure of, wherever this runs); the
    export rebuilds the model with sdpa, drops TE's saved extra state unread, and transformers' logits equal those
    of the model the run trained."""
    from megatron_pept.checkpoint.hf_export import export_to_hf

    for name in ("transformer_engine", "transformer_engine.pytorch", "flash_attn"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    run, ours = relora_run
    marker = tmp_path / "unpickled"
    copy = as_if_trained_with(run, tmp_path / "run", kernel, marker=marker)
    with pytest.raises(ConfigError, match=f"model.attention={kernel} needs"):
        make(kernel)  # the premise: this machine cannot build the run's model as it trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_to_hf(copy, tmp_path / "hf")).eval()
    torch.testing.assert_close(logits(hf, IDS[:, :12]), ours, atol=1e-5, rtol=1e-5)
    assert not marker.exists()

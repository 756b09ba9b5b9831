"""The single-process trainer: determinism, gradient accumulation, learning, the method registry."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import folder_state, name_outside

from megatron_pept.config import load_config
from megatron_pept.errors import ConfigError, DataError
from megatron_pept.trainer import Trainer


def tiny(data: Path, run_dir: Path, *overrides: str):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"data.path={data}",
            "data.seq_len=32",
            "train.steps=6",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            "train.eval_interval=3",
            "train.eval_batches=2",
            "optim.lr=3e-3",
            "optim.warmup_steps=2",
            "metrics.tensorboard=false",
            "metrics.peak_tflops=1.0",
            *overrides,
        ],
    )


def counting(fn, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("method", ["full", "relora", "galore"])
def test_activation_checkpointing_changes_nothing_but_memory(method: str, quickstart_data: Path, tmp_path: Path):
    runs = {}
    for ckpt in ("false", "true"):
        trainer = Trainer(
            tiny(
                quickstart_data,
                tmp_path / ckpt,
                f"method.name={method}",
                f"train.activation_checkpointing={ckpt}",
                "method.rank=4",
                "method.reset_every=3",
                "method.update_proj_gap=3",
            )
        )
        calls = []
        block = trainer.raw_model.model.layers["0"]
        block.forward = counting(block.forward, calls)  # forward hooks do not fire on recomputation
        runs[ckpt] = (trainer.train().train_losses, dict(trainer.raw_model.named_parameters()), len(calls))
    micro_batches = 6 * 2  # steps x accumulation
    assert runs["true"][2] - runs["false"][2] == micro_batches  # each block really ran again in backward
    assert runs["true"][0] == runs["false"][0]  # recomputation in fp32 on CPU is bit-identical
    for name, value in runs["false"][1].items():
        assert torch.equal(runs["true"][1][name], value), name


def test_same_seed_same_run_other_seed_other_run(quickstart_data: Path, tmp_path: Path) -> None:
    a = Trainer(tiny(quickstart_data, tmp_path / "a")).train()
    b = Trainer(tiny(quickstart_data, tmp_path / "b")).train()
    c = Trainer(tiny(quickstart_data, tmp_path / "c", "train.seed=1")).train()
    assert a.train_losses == b.train_losses
    assert a.val_losses == b.val_losses and sorted(a.val_losses) == [0, 3, 6]
    assert a.train_losses != c.train_losses
    assert a.tokens_seen == 6 * 8 * 32


def test_gradient_accumulation_equals_one_big_batch(quickstart_data: Path, tmp_path: Path) -> None:
    """Micro-batches of 2 x 4 accumulate to exactly the update of one batch of 8 (up to float rounding)."""
    whole = Trainer(tiny(quickstart_data, tmp_path / "w", "train.micro_batch_size=8"))
    split = Trainer(tiny(quickstart_data, tmp_path / "s", "train.micro_batch_size=4"))
    assert (whole.grad_accum_steps, split.grad_accum_steps) == (1, 2)
    lw, ls = whole.train().train_losses, split.train().train_losses
    assert lw == pytest.approx(ls, abs=2e-5)
    for (name, pw), ps in zip(whole.model.named_parameters(), split.model.parameters()):
        assert torch.allclose(pw, ps, atol=2e-5), name


def test_loss_falls_and_bf16_moments_train(quickstart_data: Path, tmp_path: Path) -> None:
    result = Trainer(tiny(quickstart_data, tmp_path / "r", "train.steps=20", "optim.state_dtype=bf16")).train()
    assert sum(result.train_losses[-4:]) / 4 < sum(result.train_losses[:4]) / 4 - 0.5
    assert result.val_losses[20] < result.val_losses[0] - 0.5


def capture_step_grads(optimizer: torch.optim.Optimizer, log: dict) -> None:
    """Record in ``log``, each time ``optimizer`` steps, the gradient of every parameter it is about to update."""

    def hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    log[p] = p.grad.detach().clone()

    optimizer.register_step_pre_hook(hook)


def global_norm(grads) -> float:
    return torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])).item()


@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["above", "below"])
def test_clipping_caps_the_update(max_norm: float, quickstart_data: Path, tmp_path: Path) -> None:
    """The gradients the optimizer steps with have global norm max_grad_norm when the raw norm is above it (each
    scaled by the same factor), and are the raw ones when it is below."""
    trainer = Trainer(tiny(quickstart_data, tmp_path / "c", f"train.max_grad_norm={max_norm}"))
    raw, consumed = {}, {}
    for p in trainer.model.parameters():  # fires after each micro-batch: the last holds the accumulated gradient
        p.register_post_accumulate_grad_hook(lambda q: raw.__setitem__(q, q.grad.detach().clone()))
    capture_step_grads(trainer.optimizer, consumed)
    _, grad_norm, _ = trainer.train_step()
    assert len(consumed) == len(raw) == len(list(trainer.model.parameters()))
    raw_norm = global_norm(raw.values())
    assert grad_norm == pytest.approx(raw_norm, rel=1e-5)  # the logged norm is the real one, before clipping
    assert (raw_norm > max_norm) == (max_norm == 1e-3)  # each case is the one its name says
    assert global_norm(consumed.values()) == pytest.approx(min(raw_norm, max_norm), rel=1e-5)
    coef = max_norm / raw_norm
    for p, grad in raw.items():
        if coef >= 1:
            assert torch.equal(consumed[p], grad)
        else:
            assert torch.allclose(consumed[p], coef * grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["above", "below"])
def test_per_layer_clipping_uses_the_previous_norm(max_norm: float, quickstart_data: Path, tmp_path: Path) -> None:
    """Per-layer updates scale step t's gradients by min(1, max_norm / (norm_{t-1} + 1e-6)); the first step is
    not clipped. The raw gradients come from a global-step twin without clipping, which matches the per-layer run
    step for step as long as nothing is clipped (tests/unit/test_galore.py::test_per_layer_equals_global_step)."""
    twin = Trainer(tiny(quickstart_data, tmp_path / "g", "train.max_grad_norm=0"))
    layered = Trainer(tiny(quickstart_data, tmp_path / "p", f"train.max_grad_norm={max_norm}", "optim.per_layer=true"))
    twin_log, layered_log = {}, {}
    capture_step_grads(twin.optimizer, twin_log)
    for sub in layered.optimizer.optimizers.values():
        capture_step_grads(sub, layered_log)
    raw, consumed, logged = [], [], []
    for _ in range(2):
        twin.train_step()
        logged.append(layered.train_step()[1])
        names = {p: n for n, p in twin.raw_model.named_parameters()}
        raw.append({names[p]: g for p, g in twin_log.items()})
        names = {p: n for n, p in layered.raw_model.named_parameters()}
        consumed.append({names[p]: g for p, g in layered_log.items()})
        twin_log.clear()
        layered_log.clear()
    assert consumed[0].keys() == raw[0].keys() and len(raw[0]) == len(list(twin.model.parameters()))
    for name, grad in raw[0].items():
        assert torch.equal(consumed[0][name], grad), name  # step 1: no previous norm, no clipping
    first_norm, raw_norm = global_norm(raw[0].values()), global_norm(raw[1].values())
    assert logged == pytest.approx([first_norm, raw_norm], rel=1e-5)  # logged: the real norms, before clipping
    coef = min(1.0, max_norm / (first_norm + 1e-6))
    assert (coef < 1) == (max_norm == 1e-3)
    assert global_norm(consumed[1].values()) == pytest.approx(coef * raw_norm, rel=1e-5)
    for name, grad in raw[1].items():
        if coef == 1:
            assert torch.equal(consumed[1][name], grad), name
        else:
            assert torch.allclose(consumed[1][name], coef * grad, rtol=1e-5, atol=0), name


def test_every_public_method_name_is_registered() -> None:
    from megatron_pept.methods import METHODS

    # The method names of the public interface (../shared/DESIGN.md, plus those added since: APOLLO, APOLLO-Mini
    # and Fira); the registry is the code's only list.
    METHOD_NAMES = (
        *("full", "lora", "relora", "redora", "repissa", "reloqra", "galore", "galore_ef", "galore_dynamic"),
        *("galore_dynamic_ef", "galore_8bit", "galore_adafactor", "adam_mini", "apollo", "apollo_mini", "fira"),
    )

    assert set(METHOD_NAMES) <= set(METHODS)


def test_config_and_data_mistakes(quickstart_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rank 1000 must be between 1 and min"):
        Trainer(tiny(quickstart_data, tmp_path / "m", "method.name=relora", "method.rank=1000"))
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch_size"):
        Trainer(tiny(quickstart_data, tmp_path / "b", "train.global_batch_size=10"))
    with pytest.raises(DataError, match="smaller than the data's tokenizer vocabulary"):
        Trainer(tiny(quickstart_data, tmp_path / "v", "model.vocab_size=100"))
    with pytest.raises(DataError, match="does not exist"):
        Trainer(tiny(tmp_path / "missing", tmp_path / "d"))
    with pytest.raises(ConfigError, match="cannot run with parallel.backend=deepspeed"):
        Trainer(tiny(quickstart_data, tmp_path / "p", "parallel.backend=deepspeed", "optim.per_layer=true"))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("entry", ["tokenizer", "shard"])
def test_a_data_folder_naming_files_outside_it_is_refused(quickstart_data: Path, tmp_path: Path, entry: str, how: str):
    """The trainer reads the files an index names and copies its tokenizer into every checkpoint under the
    recorded name: a name leading out of the data folder wrote outside the run ('..') or copied an outside file
    into each checkpoint (absolute, symlink), and a shard entry made it train on any file. Refused while the run
    is built, before it writes anything."""
    data = tmp_path / "data"
    shutil.copytree(quickstart_data, data)
    name_outside(data, entry, how)
    before = folder_state(tmp_path)
    with pytest.raises(DataError, match="an index may only name files inside its own folder"):
        Trainer(tiny(data, tmp_path / "run", "checkpoint.interval=1"))
    assert folder_state(tmp_path) == before


def rewrite_shard(data: Path, *, split: str, number: int, tokens: np.ndarray) -> None:
    """Replace a shard's tokens (same length) and its index entry's sha256 and max_id, as prepare-data writes them."""
    raw = json.loads((data / "index.json").read_text())
    entry = raw["splits"][split]["shards"][number]
    payload = tokens.astype(raw["dtype"]).tobytes()
    (data / entry["file"]).write_bytes(payload)
    entry["sha256"], entry["max_id"] = hashlib.sha256(payload).hexdigest(), int(tokens.max())
    (data / "index.json").write_text(json.dumps(raw))


def forget_largest_ids(raw: dict) -> None:
    """Make ``raw`` (a parsed index.json) an index of a version that did not record max_id."""
    for split in raw["splits"].values():
        for entry in split["shards"]:
            entry.pop("max_id", None)


@pytest.mark.parametrize("recorded", [True, False], ids=["max_id", "old_index"])
@pytest.mark.parametrize("where", ["train", "val"])
def test_ids_past_the_index_vocabulary_are_refused(
    quickstart_data: Path, tmp_path: Path, where: str, recorded: bool
) -> None:
    """Data whose index records a smaller vocabulary than its ids need (edited, or shards from another tokenizer)
    built a model too small for them: an IndexError in training, or only at the first evaluation when just the
    validation split holds such an id (a device-side assert on a GPU). Refused before the first step, with the
    folder, the id and the vocabulary; an index without max_id (older) is read for it."""
    data = tmp_path / "data"
    shutil.copytree(quickstart_data, data)
    raw = json.loads((data / "index.json").read_text())
    vocab = raw["vocab_size"]
    big = vocab + 5
    shard = raw["splits"][where]["shards"][0]
    tokens = np.fromfile(data / shard["file"], dtype=raw["dtype"]).astype(np.int64)
    tokens[len(tokens) // 2] = big
    rewrite_shard(data, split=where, number=0, tokens=tokens)
    raw = json.loads((data / "index.json").read_text())
    raw["vocab_size"] = vocab + 1  # what an edited index claims; the tokenizer has fewer ids than this shard holds
    if not recorded:
        forget_largest_ids(raw)
    (data / "index.json").write_text(json.dumps(raw))
    before = folder_state(tmp_path)
    with pytest.raises(DataError) as err:
        Trainer(tiny(data, tmp_path / "run", "train.eval_at_start=false"))
    message = str(err.value)
    assert f"{data} holds token id {big}" in message and f"vocabulary of {vocab + 1} ids" in message, message
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("recorded", [True, False], ids=["max_id", "old_index"])
def test_blended_ids_past_the_model_vocabulary_are_refused(quickstart_data: Path, tmp_path: Path, recorded: bool):
    """A blended source whose own index allows more ids than the model has (the model takes the first source's
    vocabulary): refused with the source, the id and the model's vocabulary."""
    wide = tmp_path / "wide"
    shutil.copytree(quickstart_data, wide)
    raw = json.loads((wide / "index.json").read_text())
    vocab = raw["vocab_size"]
    tokens = np.fromfile(wide / raw["splits"]["train"]["shards"][-1]["file"], dtype=raw["dtype"]).astype(np.int64)
    tokens[-3] = vocab + 100
    rewrite_shard(wide, split="train", number=len(raw["splits"]["train"]["shards"]) - 1, tokens=tokens)
    raw = json.loads((wide / "index.json").read_text())
    raw["vocab_size"] = 2 * vocab
    if not recorded:
        forget_largest_ids(raw)
    (wide / "index.json").write_text(json.dumps(raw))
    blend = f"data.blend=[{{path: {quickstart_data}, weight: 1}}, {{path: {wide}, weight: 1}}]"
    with pytest.raises(DataError) as err:
        Trainer(tiny(quickstart_data, tmp_path / "run", blend))
    message = str(err.value)
    assert f"{wide} holds token id {vocab + 100}" in message and f"vocabulary has {vocab} ids" in message, message
    assert not (tmp_path / "run").exists()

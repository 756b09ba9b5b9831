"""The single-process trainer: determinism, gradient accumulation, learning, the method registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


def test_clipping_caps_the_update(quickstart_data: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny(quickstart_data, tmp_path / "c", "train.max_grad_norm=1e-3"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    _, grad_norm, _ = trainer.train_step()
    assert grad_norm > 1e-3  # the logged norm is the real one, before clipping
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_every_public_method_name_is_registered() -> None:
    from megatron_pept.config import METHOD_NAMES
    from megatron_pept.methods import METHODS

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

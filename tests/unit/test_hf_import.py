"""Hugging Face in: a run starts from an HF LLaMA folder (model.init_from) with every method, and data is prepared
with an HF tokenizer (tokenizer.json)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import tiny

from megatron_pept.errors import ConfigError
from megatron_pept.trainer import Trainer

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, Path]:
    """A trained run exported to HF: (the HF folder, the exporting model's logits on IDS, the run's data)."""
    from megatron_pept.checkpoint.hf_export import export_to_hf

    tmp = tmp_path_factory.mktemp("hf-in")
    trainer = Trainer(tiny(quickstart_data, tmp / "run", "train.steps=12", "checkpoint.interval=12"))
    trainer.train()
    with torch.no_grad():
        logits = trainer.raw_model.eval()(IDS)
    return export_to_hf(tmp / "run", tmp / "hf"), logits, quickstart_data


IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["full", "relora", "redora", "galore", "adam_mini"])
def test_init_from_an_export_computes_what_the_exporting_run_computed(method: str, exported, tmp_path: Path) -> None:
    """The new run's model before its first step equals the exporting run's (ReLoRA-family adapters start at
    B = 0 and DoRA's magnitude is the rows' norm: the function is unchanged); continued pretraining then trains:
    it starts far below a random initialisation's loss and goes down."""
    folder, logits, data = exported
    extra = ["method.rank=4", "method.reset_every=3"] if method != "full" else []
    trainer = Trainer(tiny(data, tmp_path / "run", f"model.init_from={folder}", f"method.name={method}", *extra))
    with torch.no_grad():
        torch.testing.assert_close(trainer.raw_model.eval()(IDS), logits, atol=1e-5, rtol=1e-5)
    trainer.raw_model.train()
    losses = trainer.train().train_losses
    fresh = Trainer(tiny(data, tmp_path / "fresh", f"method.name={method}", *extra)).train().train_losses
    assert losses[0] < fresh[0] - 1.0, (losses, fresh)  # the loaded weights are what trains
    assert min(losses[-2:]) < losses[0], losses


def test_init_from_refuses_another_shape_in_one_line_with_the_overrides_that_match(exported, tmp_path: Path) -> None:
    folder, _, data = exported
    with pytest.raises(ConfigError, match=r"model.hidden_size=32.*; set model.hidden_size=64$"):
        Trainer(tiny(data, tmp_path / "run", f"model.init_from={folder}", "model.hidden_size=32"))
    assert not (tmp_path / "run").exists()  # a refused run writes nothing
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_pept.train",
            "--config",
            "configs/quickstart.yaml",
            f"run_dir={tmp_path / 'cli'}",
            f"data.path={data}",
            f"model.init_from={folder}",
            "model.num_layers=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("set model.num_layers=2"), proc.stderr[-2000:]


def test_init_from_refuses_pickled_weights_missing_tensors_and_other_architectures(exported, tmp_path: Path) -> None:
    folder, _, data = exported

    def refused(mutate, match: str) -> None:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, copy)
        mutate(copy)
        with pytest.raises(ConfigError, match=match):
            Trainer(tiny(data, tmp_path / "run", f"model.init_from={copy}"))

    def pickled_only(copy: Path) -> None:
        (copy / "model.safetensors").rename(copy / "pytorch_model.bin")

    def missing_tensor(copy: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(copy / "model.safetensors")
        del state["model.layers.1.mlp.down_proj.weight"]
        save_file(state, copy / "model.safetensors", metadata={"format": "pt"})

    def mistral(copy: Path) -> None:
        cfg = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))

    refused(pickled_only, "pickled")
    refused(missing_tensor, "no tensor model.layers.1.mlp.down_proj.weight")
    refused(mistral, "only LLaMA models")
    with pytest.raises(ConfigError, match="no such folder"):
        Trainer(tiny(data, tmp_path / "run", f"model.init_from={tmp_path / 'nowhere'}"))


def test_an_hf_folder_given_as_resume_says_to_use_init_from(exported, tmp_path: Path) -> None:
    from megatron_pept.errors import UserError

    folder, _, data = exported
    with pytest.raises(UserError, match=f"Hugging Face model folder, not a checkpoint; .*model.init_from={folder}"):
        Trainer(tiny(data, tmp_path / "run", f"checkpoint.resume={folder}"))


def test_sharded_safetensors_load_like_one_file(exported, tmp_path: Path) -> None:
    """A released model's weights come in shards listed by model.safetensors.index.json."""
    folder, logits, data = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB", safe_serialization=True)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    trainer = Trainer(tiny(data, tmp_path / "run", f"model.init_from={tmp_path / 'sharded'}"))
    with torch.no_grad():
        torch.testing.assert_close(trainer.raw_model.eval()(IDS), logits, atol=1e-5, rtol=1e-5)


def make_hf_tokenizer(folder: Path, texts: list[str]) -> Path:
    """A small byte-level BPE trained with the tokenizers library, saved as a model folder would hold it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_data_prepared_with_an_hf_tokenizer_trains_and_its_checkpoints_carry_it(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from megatron_pept.data.prepare import PrepareOptions, prepare_dataset
    from megatron_pept.data.shards import read_index

    texts = [f"Document {i}: the fox ate {i * 7} berries.\n\tThen it slept  under tree {i % 5}." for i in range(400)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok_dir = make_hf_tokenizer(tmp_path / "tok", texts)
    prepare_dataset(
        PrepareOptions(
            inputs=(str(tmp_path / "corpus.jsonl"),),
            tokenizer=str(tok_dir),
            output=str(tmp_path / "data"),
            val_fraction=0.1,
            add_bos=True,
            workers=1,
        ),
        show_progress=False,
    )
    index = read_index(tmp_path / "data")
    backend = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert index.tokenizer_file == "tokenizer.json" and (tmp_path / "data" / "tokenizer.json").is_file()
    assert (index.bos_id, index.eos_id) == (0, 1) and index.vocab_size == backend.get_vocab_size()
    tokens = torch.from_numpy(np.fromfile(tmp_path / "data" / index.splits["train"].shards[0].file, dtype=index.dtype))
    first = tokens[: int((tokens == 1).nonzero()[0]) + 1].tolist()  # BOS ids EOS of the first train document
    assert first[0] == 0 and first[-1] == 1
    assert backend.decode(first[1:-1]) in texts  # the text comes back exactly (tabs, double spaces, newlines)

    trainer = Trainer(tiny(tmp_path / "data", tmp_path / "run", "train.steps=4", "checkpoint.interval=4"))
    losses = trainer.train().train_losses
    assert all(loss == loss for loss in losses)
    saved = tmp_path / "run" / "checkpoints" / "step_00000004" / "tokenizer" / "tokenizer.json"
    assert saved.read_bytes() == (tok_dir / "tokenizer.json").read_bytes()

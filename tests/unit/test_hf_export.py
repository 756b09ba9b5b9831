"""HF export: transformers loads the exported folder, its logits equal our model's (adapters merged), generate
runs, and AutoTokenizer encodes like the run's SentencePiece model."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from test_trainer import tiny

from megatron_pept.errors import UserError
from megatron_pept.trainer import Trainer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "method", ["full", "relora", "redora", "repissa", "galore", "relora@nf4", "repissa@int8", "reloqra@nf4"]
)
def test_exported_model_matches_ours(method: str, quickstart_data: Path, tmp_path: Path) -> None:
    """Quantised bases (METHOD@FORMAT) export dequantised: transformers computes what our model computes."""
    from megatron_pept.checkpoint.hf_export import export_to_hf

    name, _, fmt = method.partition("@")
    trainer = Trainer(
        tiny(
            quickstart_data,
            tmp_path / "run",
            f"method.name={name}",
            "method.rank=4",
            "method.reset_every=4",
            "checkpoint.interval=3",
            *([f"method.base_dtype={fmt}"] if fmt else []),
        )
    )
    trainer.train()
    out = export_to_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, trainer.model_args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trainer.raw_model.eval()(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    generated = hf.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)

    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(quickstart_data / "tokenizer.model"))
    for text in ("Once upon a time a small fox found a shiny stone.", " Two  spaces,\ta tab\n\nand 12345 ﬁ é 😀 "):
        assert tok(text)["input_ids"] == sp.encode(text)  # the quickstart data has no BOS
        assert tok.decode(tok(text)["input_ids"]) == text


def test_export_refuses_to_overwrite_and_needs_a_checkpoint(quickstart_data: Path, tmp_path: Path) -> None:
    from megatron_pept.checkpoint.hf_export import export_to_hf

    with pytest.raises(UserError, match="does not exist"):
        export_to_hf(tmp_path / "missing", tmp_path / "hf")
    Trainer(tiny(quickstart_data, tmp_path / "run", "train.steps=2", "checkpoint.interval=2")).train()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_to_hf(tmp_path / "run", tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"

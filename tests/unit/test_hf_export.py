"""HF export: transformers loads the exported folder, its logits equal our model's (adapters merged), generate
runs, and AutoTokenizer encodes like the run's SentencePiece model or its Hugging Face tokenizer.json; config.json
and tokenizer_config.json read the same in transformers 4.x (checked when MEGATRON_PEPT_TF4_PYTHON names a python
that has it) and 5.x; max_position_embeddings comes from the model configuration."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import warnings
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


# -- where the export goes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("small") / "run"
    Trainer(tiny(quickstart_data, run, "train.steps=2", "checkpoint.interval=2")).train()
    return run


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_export_removes_no_folder_it_did_not_make(small_run: Path, tmp_path: Path) -> None:
    """The export used to write to the fixed name .NAME.tmp and delete whatever was there first: a user's folder
    of that name, or the work of a second export to the same output. It now works in a folder of its own."""
    from megatron_pept.checkpoint.hf_export import export_to_hf

    mine = tmp_path / ".hf.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    out = export_to_hf(small_run, tmp_path / "hf")
    assert (mine / "notes.txt").read_text() == "mine" and listing(mine) == {"notes.txt": b"mine"}
    assert "notes.txt" not in listing(out) and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.tmp", "hf"]  # nothing else left beside it
    assert (out.stat().st_mode & 0o777) == (mine.stat().st_mode & 0o777)  # made like any folder (umask)
    (tmp_path / "empty").mkdir()  # an existing empty folder is filled
    assert (export_to_hf(small_run, tmp_path / "empty") / "config.json").is_file()
    assert (export_to_hf(small_run, tmp_path / "new" / "deep" / "hf") / "config.json").is_file()  # parents made


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces_a_filled_output_only_once_the_new_export_is_complete(
    exchange: bool, small_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without overwrite a filled output is refused and kept; with it, a failed export (here the disk fills while
    config.json is written) leaves the old folder as it was, and a complete one replaces it. Both ways of
    replacing: one atomic exchange (renameat2) and, where a filesystem has none, the old folder moved aside."""
    from megatron_pept.checkpoint import hf_export

    if not exchange:
        monkeypatch.setattr(hf_export, "_exchange", lambda a, b: False)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("the old export")
    (out / "old.txt").write_text("old")
    before = listing(out)
    with pytest.raises(UserError, match=r"exists and is not empty; .* --overwrite"):
        hf_export.export_to_hf(small_run, out)
    assert listing(out) == before

    def full_disk(path: Path, **kwargs) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with monkeypatch.context() as patch:
        patch.setattr(hf_export, "_write_config_for_both_lines", full_disk)
        with pytest.raises(
            UserError, match=rf"^cannot write the export to {out}: No space left on device; .*unchanged"
        ):
            hf_export.export_to_hf(small_run, out, overwrite=True)
    assert listing(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

    hf_export.export_to_hf(small_run, out, overwrite=True)
    assert "old.txt" not in listing(out) and json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_failed_write_to_a_new_output_leaves_nothing(small_run: Path, tmp_path: Path, monkeypatch) -> None:
    """Parent folders made for the export go too; an error that is not a failed write keeps its traceback."""
    from megatron_pept.checkpoint import hf_export

    def rust_full_disk(*args, **kwargs) -> None:  # safetensors and tokenizers report I/O errors in their message
        raise Exception("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(hf_export, "_write_config_for_both_lines", rust_full_disk)
    with pytest.raises(UserError, match=r"File too large; a file size limit \(ulimit -f\).*nothing was left behind"):
        hf_export.export_to_hf(small_run, tmp_path / "a" / "b" / "hf")
    assert not list(tmp_path.iterdir())

    def no_inodes_left(parent: Path, prefix: str) -> Path:  # the parents are made, the work folder is not
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(parent / prefix))

    with monkeypatch.context() as patch:
        patch.setattr(hf_export, "_new_folder", no_inodes_left)
        with pytest.raises(UserError, match=r"No space left on device; .*nothing was left behind"):
            hf_export.export_to_hf(small_run, tmp_path / "a" / "b" / "hf")
    assert not list(tmp_path.iterdir())

    def bug(*args, **kwargs) -> None:
        raise KeyError("rope_theta")

    monkeypatch.setattr(hf_export, "_write_config_for_both_lines", bug)
    with pytest.raises(KeyError):
        hf_export.export_to_hf(small_run, tmp_path / "hf")
    assert not list(tmp_path.iterdir())


def test_two_exports_to_one_output_do_not_mix(small_run: Path, tmp_path: Path, monkeypatch) -> None:
    """Each works in its own folder; the one that finishes second finds the output filled and says so, leaving
    the first one's export whole (they shared .NAME.tmp before: the second deleted the first one's work)."""
    from megatron_pept.checkpoint import hf_export

    out = tmp_path / "hf"
    write_config = hf_export._write_config_for_both_lines

    def other_export_finishes_first(path: Path, **kwargs) -> None:
        write_config(path, **kwargs)
        monkeypatch.setattr(hf_export, "_write_config_for_both_lines", write_config)
        hf_export.export_to_hf(small_run, out, dtype="bf16")

    monkeypatch.setattr(hf_export, "_write_config_for_both_lines", other_export_finishes_first)
    with pytest.raises(UserError, match=r"Directory not empty; it was filled while this export ran"):
        hf_export.export_to_hf(small_run, out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"  # the other one's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_link_a_file_or_the_checkpoint_is_no_output(small_run: Path, tmp_path: Path) -> None:
    from megatron_pept.checkpoint.hf_export import export_to_hf

    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "to-folder").symlink_to(target)
    (tmp_path / "to-file").symlink_to(tmp_path / "file.txt")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    before = listing(tmp_path)
    for name in ("to-folder", "to-file", "dangling"):
        for overwrite in (False, True):
            with pytest.raises(UserError, match=rf"^--output {tmp_path / name} is a symbolic link; "):
                export_to_hf(small_run, tmp_path / name, overwrite=overwrite)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=rf"^--output {tmp_path / 'file.txt'} is a file, not a folder"):
            export_to_hf(small_run, tmp_path / "file.txt", overwrite=overwrite)
    assert listing(tmp_path) == before and not list(target.iterdir()) and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file.txt", "target", "to-file", "to-folder"]

    checkpoint = small_run / "checkpoints" / "step_00000002"
    kept = listing(small_run)
    for out in (small_run, small_run / "checkpoints", checkpoint, checkpoint / "hf"):
        with pytest.raises(UserError, match=r"overlaps the checkpoint .*; give a folder outside it"):
            export_to_hf(small_run, out, overwrite=True)
    assert listing(small_run) == kept


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_deepspeed_checkpoint_holding_code_is_refused_without_running_it(small_run: Path, tmp_path: Path) -> None:
    """DeepSpeed's zero_to_fp32 loads its files with pickle; the export hands it a torch.load with weights_only=True.
    A checkpoint whose DeepSpeed model and optimizer files hold a pickled call (here one that creates a marker
    file, as it does when unpickled) is refused in one line naming DeepSpeed's script; the call never runs."""
    pytest.importorskip("deepspeed")
    from megatron_pept.checkpoint import store
    from megatron_pept.checkpoint.hf_export import export_to_hf

    probe = tmp_path / "probe.pt"
    torch.save({"module": Payload(tmp_path / "probe-ran")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").exists()  # the payload works when unpickled

    marker = tmp_path / "ran"
    checkpoint = shutil.copytree(small_run / "checkpoints" / "step_00000002", tmp_path / "step_00000002")
    (checkpoint / store.MARKER).unlink()
    state = checkpoint / "deepspeed" / "state"
    state.mkdir(parents=True)
    (checkpoint / "deepspeed" / "latest").write_text("state")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save(
            {"module": Payload(marker), "buffer_names": [], "optimizer_state_dict": Payload(marker)}, state / name
        )
    store.write_marker(checkpoint)  # a complete checkpoint as far as its marker says
    with pytest.raises(UserError, match=r"DeepSpeed's partitions cannot be exported \(.*\); .*zero_to_fp32\.py") as err:
        export_to_hf(checkpoint, tmp_path / "hf")
    assert "\n" not in str(err.value)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe-ran", "probe.pt", "step_00000002"]


# -- config.json and tokenizer_config.json for transformers 4.x and 5.x ---------------------------------------------

IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
TEXTS = ["Once upon a time a small fox found a shiny stone.", " Two  spaces,\ta tab\n\nand 12345 é 😀 ", ""]


@pytest.fixture(scope="module")
def relora_export(quickstart_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A short ReLoRA run with a RoPE base other than transformers' default (10000), exported in fp32 and bf16:
    {"fp32": folder, "bf16": folder, "logits": our model's logits on IDS, "run": run_dir}."""
    from megatron_pept.checkpoint.hf_export import export_to_hf

    tmp = tmp_path_factory.mktemp("hf-both")
    overrides = ["method.name=relora", "method.rank=4", "method.reset_every=2", "model.rope_theta=50000"]
    trainer = Trainer(tiny(quickstart_data, tmp / "run", *overrides, "train.steps=3", "checkpoint.interval=3"))
    trainer.train()
    with torch.no_grad():
        logits = trainer.raw_model.eval()(IDS)
    return {
        "fp32": export_to_hf(tmp / "run", tmp / "fp32"),
        "bf16": export_to_hf(tmp / "run", tmp / "bf16", dtype="bf16"),
        "logits": logits,
        "run": tmp / "run",
    }


def test_config_json_carries_the_keys_of_both_transformers_lines(relora_export: dict) -> None:
    """transformers 5 writes only dtype and rope_parameters; 4.x reads torch_dtype and rope_theta (a missing
    rope_theta silently becomes 10000 there). Both sets are written, saying the same."""
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        cfg = json.loads((relora_export[name] / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
        assert cfg["torch_dtype"] == cfg["dtype"] == dtype, name
        assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 50000.0, name
        assert (
            cfg["rope_parameters"]["rope_type"] == "default" and "rope_scaling" in cfg and cfg["rope_scaling"] is None
        )
        assert cfg["max_position_embeddings"] == 2048  # not the training seq_len (32)
        loaded = transformers.AutoConfig.from_pretrained(relora_export[name])  # 5.x reads its own keys alike
        assert loaded.rope_parameters["rope_theta"] == 50000.0 and loaded.dtype == getattr(torch, dtype)
        tok_cfg = json.loads((relora_export[name] / "tokenizer_config.json").read_text())
        assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["model_max_length"] == 2048
        assert not isinstance(tok_cfg.get("extra_special_tokens"), list)  # 4.x reads that key as a dict
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(relora_export["bf16"] / "model.safetensors").values()} == {torch.bfloat16}
    hf = transformers.AutoModelForCausalLM.from_pretrained(relora_export["fp32"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, relora_export["logits"], atol=1e-5, rtol=1e-5)


def extra_tokens_tokenizer(folder: Path) -> Path:
    """A tokenizer with extra special tokens saved by transformers 5 (which lists them under extra_special_tokens),
    then rewritten by the export's function."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_pept.checkpoint.hf_export import _write_tokenizer_config_for_both_lines

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "<pad>": 2, "<tool>": 3, "hi": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", extra_special_tokens=["<pad>", "<tool>"]
    )
    tok.save_pretrained(folder)
    assert json.loads((folder / "tokenizer_config.json").read_text())["extra_special_tokens"] == ["<pad>", "<tool>"]
    _write_tokenizer_config_for_both_lines(folder, model_max_length=64)
    return folder


def test_extra_special_tokens_are_written_in_a_form_both_lines_read(tmp_path: Path) -> None:
    """transformers 5 saves extra special tokens as a list under extra_special_tokens, which 4.x takes for a dict
    of named tokens; they are rewritten as additional_special_tokens, which 5.x reads back as the same tokens."""
    folder = extra_tokens_tokenizer(tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert "extra_special_tokens" not in cfg and cfg["additional_special_tokens"] == ["<pad>", "<tool>"]
    loaded = transformers.AutoTokenizer.from_pretrained(folder)
    assert loaded.extra_special_tokens == ["<pad>", "<tool>"] and loaded.model_max_length == 64
    assert loaded("hi <tool>")["input_ids"] == [4, 3]


def test_max_position_embeddings_comes_from_the_model_config(quickstart_data: Path, tmp_path: Path) -> None:
    from megatron_pept.checkpoint.hf_export import export_to_hf
    from megatron_pept.models.hf import declared_context

    assert declared_context(None, 32, source="x", fix="y") == 2048  # LLaMA's context ...
    assert declared_context(None, 4096, source="x", fix="y") == 4096  # ... or a longer training length
    assert declared_context(3000, 32, source="x", fix="y") == 3000
    with pytest.raises(UserError, match=r"^model.max_position_embeddings is 16, shorter than the 32-token .*; fix$"):
        declared_context(16, 32, source="model.max_position_embeddings", fix="fix")

    run = tmp_path / "run"
    Trainer(
        tiny(quickstart_data, run, "model.max_position_embeddings=4096", "train.steps=2", "checkpoint.interval=2")
    ).train()
    assert (
        json.loads((export_to_hf(run, tmp_path / "a") / "config.json").read_text())["max_position_embeddings"] == 4096
    )
    out = export_to_hf(run, tmp_path / "b", max_position_embeddings=1024)  # tools/convert_to_hf.py's override
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 1024
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 1024
    with pytest.raises(UserError, match=r"--max-position-embeddings is 16, shorter .*; give 32 or more$"):
        export_to_hf(run, tmp_path / "c", max_position_embeddings=16)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c*"))


# -- a Hugging Face tokenizer.json carried -------------------------------------------------------------------------

HF_TEXTS = [f"Doc {i}: the fox ate {i * 7} berries.\n\tThen it slept  under tree {i % 5}." for i in range(300)]


def train_bpe(texts: list[str], *, bos: bool):
    """A small byte-level BPE trained with the tokenizers library (ids 0-3: <unk>, <s>, </s>, <pad>); with ``bos``
    a post-processor puts <s> before each text, as LLaMA 3's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return tok


@pytest.fixture(scope="module")
def hf_tokenizer_export(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Data prepared with a tokenizer.json (BOS before each document), a short run whose checkpoint carries it,
    and the export: {"backend": the tokenizers.Tokenizer, "export": folder, "checkpoint": folder}."""
    from megatron_pept.checkpoint.hf_export import export_to_hf
    from megatron_pept.data.prepare import PrepareOptions, prepare_dataset

    tmp = tmp_path_factory.mktemp("hf-tok")
    backend = train_bpe(HF_TEXTS, bos=True)
    (tmp / "tok").mkdir()
    backend.save(str(tmp / "tok" / "tokenizer.json"))
    (tmp / "tok" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (tmp / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in HF_TEXTS))
    options = PrepareOptions(
        inputs=(str(tmp / "corpus.jsonl"),),
        tokenizer=str(tmp / "tok"),
        output=str(tmp / "data"),
        val_fraction=0.1,
        add_bos=True,
        workers=1,
    )
    prepare_dataset(options, show_progress=False)
    Trainer(tiny(tmp / "data", tmp / "run", "train.steps=2", "checkpoint.interval=2")).train()
    checkpoint = tmp / "run" / "checkpoints" / "step_00000002"
    assert (checkpoint / "tokenizer" / "tokenizer.json").is_file()
    assert not (checkpoint / "tokenizer" / "tokenizer.model").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_to_hf(tmp / "run", tmp / "hf")
    assert not [w for w in caught if "BOS" in str(w.message)]  # the pipeline adds the data's BOS itself
    return {"backend": backend, "export": out, "checkpoint": checkpoint}


def test_an_hf_tokenizer_json_is_exported_for_autotokenizer(hf_tokenizer_export: dict) -> None:
    """AutoTokenizer on the export encodes and decodes as the tokenizers.Tokenizer the data was made with; BOS
    and EOS are the tokens of the ids in the checkpoint's meta.json."""
    backend, out = hf_tokenizer_export["backend"], hf_tokenizer_export["export"]
    meta = json.loads((hf_tokenizer_export["checkpoint"] / "meta.json").read_text())["tokenizer"]
    assert (meta["bos_id"], meta["eos_id"]) == (1, 2)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (1, 2, backend.get_vocab_size())
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["model_max_length"] == 2048
    for text in [*TEXTS, *HF_TEXTS[:3], "unseen words: zebra quokka ÆØÅ"]:
        ids = backend.encode(text).ids
        assert ids[0] == 1 and tok(text)["input_ids"] == ids, text
        assert tok(text, add_special_tokens=False)["input_ids"] == backend.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=True) == backend.decode(ids) == text, text


def test_an_hf_tokenizer_without_the_datas_bos_exports_with_a_warning(tmp_path: Path) -> None:
    from megatron_pept.checkpoint.hf_export import _save_hf_tokenizer

    backend = train_bpe(HF_TEXTS[:50], bos=False)
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "out").mkdir()
    with pytest.warns(UserWarning, match=r"prepared with BOS \('<s>'\) .* does not add it"):
        _save_hf_tokenizer(transformers, tmp_path / "tokenizer.json", tmp_path / "out", bos_id=1, eos_id=2)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok(TEXTS[0])["input_ids"] == backend.encode(TEXTS[0]).ids and tok.bos_token == "<s>"
    with pytest.raises(UserError, match="has no token of id 999"):
        _save_hf_tokenizer(transformers, tmp_path / "tokenizer.json", tmp_path / "x", bos_id=None, eos_id=999)


# -- the export as transformers 4.x reads it ---------------------------------------------------------------------

TF4_ENV = "MEGATRON_PEPT_TF4_PYTHON"
TF4_SCRIPT = """
import json, sys
import torch, transformers
from safetensors.torch import save_file
ids, texts, models, tokenizers, out = sys.argv[1:]
ids, texts = torch.tensor(json.loads(ids)), json.loads(texts)
report, logits = {"version": transformers.__version__}, {}
for name, folder in {**json.loads(models), **json.loads(tokenizers)}.items():
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    report[name] = {
        "tokenizer": type(tok).__name__, "model_max_length": tok.model_max_length,
        "ids": [tok(t)["input_ids"] for t in texts], "decoded": [tok.decode(tok(t)["input_ids"]) for t in texts],
        "special": [tok.bos_token, tok.eos_token, tok.unk_token, list(tok.additional_special_tokens)],
    }
    if name not in json.loads(models):
        continue
    cfg = transformers.AutoConfig.from_pretrained(folder)
    report[name].update(
        rope_theta=cfg.rope_theta, torch_dtype=str(cfg.torch_dtype), rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits[name] = model(ids % cfg.vocab_size).logits.contiguous()
save_file(logits, out)
print(json.dumps(report))
"""


@pytest.mark.slow  # a process
def test_transformers_4_reads_the_export_as_5_does(relora_export: dict, hf_tokenizer_export: dict, tmp_path: Path):
    """With MEGATRON_PEPT_TF4_PYTHON=<a python with transformers 4.x and torch> (e.g. a venv with
    transformers==4.46.3), that interpreter loads the exports (a SentencePiece and a tokenizer.json tokenizer, fp32
    and bf16 weights, extra special tokens) and must read the same config, compute the same logits and encode and
    decode as transformers 5 does here."""
    python = os.environ.get(TF4_ENV)
    if not python:
        pytest.skip(f"{TF4_ENV} is not set: no transformers 4.x python to load the export with")
    from safetensors.torch import load_file

    models = {"sp": relora_export["fp32"], "bf16": relora_export["bf16"], "json": hf_tokenizer_export["export"]}
    extra = extra_tokens_tokenizer(tmp_path / "extra")
    texts = [*TEXTS, HF_TEXTS[0], "hi <tool> hi"]
    proc = subprocess.run(
        [
            python,
            "-c",
            TF4_SCRIPT,
            json.dumps(IDS.tolist()),
            json.dumps(texts),
            json.dumps({k: str(v) for k, v in models.items()}),
            json.dumps({"extra": str(extra)}),
            str(tmp_path / "logits.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["version"].startswith("4."), report["version"]
    theirs = load_file(tmp_path / "logits.safetensors")
    for name, folder in {**models, "extra": extra}.items():
        got, tok = report[name], transformers.AutoTokenizer.from_pretrained(folder)
        assert got["tokenizer"] == "PreTrainedTokenizerFast" and got["model_max_length"] == tok.model_max_length
        assert got["ids"] == [tok(t)["input_ids"] for t in texts], name
        assert got["decoded"] == [tok.decode(tok(t)["input_ids"]) for t in texts], name
        assert got["special"] == [tok.bos_token, tok.eos_token, tok.unk_token, list(tok.extra_special_tokens)], name
        if name == "extra":
            continue
        cfg = transformers.AutoConfig.from_pretrained(folder)
        assert got["rope_theta"] == cfg.rope_parameters["rope_theta"], name
        assert got["torch_dtype"] == str(cfg.dtype) and got["rope_scaling"] is None, name
        assert got["max_position_embeddings"] == cfg.max_position_embeddings == 2048, name
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs[name], hf(IDS % cfg.vocab_size).logits, atol=1e-5, rtol=1e-5)
    assert report["sp"]["rope_theta"] == 50000.0 and report["bf16"]["torch_dtype"] == "torch.bfloat16"
    assert report["extra"]["special"][3] == ["<pad>", "<tool>"]
    torch.testing.assert_close(theirs["sp"], relora_export["logits"], atol=1e-5, rtol=1e-5)

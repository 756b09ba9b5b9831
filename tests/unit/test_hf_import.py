"""Hugging Face in: a run starts from an HF LLaMA folder (model.init_from) with every method, and data is prepared
with an HF tokenizer (tokenizer.json)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import tiny

from launch import run, train_command
from megatron_pept.errors import ConfigError
from megatron_pept.trainer import Trainer

transformers = pytest.importorskip("transformers")


def train_cli(*overrides: str) -> subprocess.CompletedProcess[str]:
    """``python -m megatron_pept.train`` on the quickstart config with ``overrides``."""
    return run(train_command(*overrides), timeout=300)


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


@pytest.mark.slow  # a training process
def test_init_from_of_another_shape_through_the_cli_is_one_line(exported, tmp_path: Path) -> None:
    folder, _, data = exported
    proc = train_cli(
        f"run_dir={tmp_path / 'cli'}", f"data.path={data}", f"model.init_from={folder}", "model.num_layers=3"
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


# -- a folder is untrusted input -------------------------------------------------------------------------------------

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def debug_model(exported) -> torch.nn.Module:
    """The model the exporting run built (the folder's shape), to load folders into directly."""
    from megatron_pept.models import build_model
    from megatron_pept.models.llama import LlamaArgs

    (meta,) = (exported[0].parent / "run" / "checkpoints").glob("step_*/meta.json")
    return build_model(LlamaArgs(**json.loads(meta.read_text())["model_args"]), device="cpu")


@pytest.fixture(scope="module")
def sharded(exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export saved again in several safetensors files listed by an index."""
    folder = tmp_path_factory.mktemp("sharded") / "model"
    transformers.AutoModelForCausalLM.from_pretrained(exported[0]).save_pretrained(
        folder, max_shard_size="200KB", safe_serialization=True
    )
    assert len(set(json.loads((folder / INDEX).read_text())["weight_map"].values())) > 1
    return folder


def copy_of(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def first_shard(folder: Path) -> str:
    return sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))[0]


def rename_in_index(folder: Path, old: str, new: str) -> None:
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {k: new if v == old else v for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))


def refused(model: torch.nn.Module, folder: Path, match: str) -> str:
    from megatron_pept.models.hf_import import load_hf_weights

    with pytest.raises(ConfigError, match=match) as err:
        load_hf_weights(model, folder)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_init_from_reads_weight_files_only_from_inside_the_folder(sharded, debug_model, tmp_path: Path) -> None:
    """The index's file names are data: one leading out of the folder (.., an absolute path, a link pointing out)
    would load a file the folder's author chose anywhere on the machine; each is refused, though the file there
    is a valid shard. Links inside the folder, and those of a Hugging Face hub cache snapshot into its blobs, load."""
    from megatron_pept.models.hf_import import load_hf_weights

    first = first_shard(sharded)
    outside = tmp_path / first
    shutil.copyfile(sharded / first, outside)  # a valid shard, outside every folder given
    for case, name in (("dotdot", f"../{first}"), ("absolute", str(outside)), ("link", "link.safetensors")):
        folder = copy_of(sharded, tmp_path / case)
        (folder / first).unlink()
        if case == "link":
            (folder / name).symlink_to(outside)
        rename_in_index(folder, first, name)
        if case == "link":
            refused(
                debug_model, folder, rf"link.safetensors is a symbolic link leading out of the folder \(to {outside}\)"
            )
        else:
            refused(debug_model, folder, rf'names "{re.escape(name)}" as a weight file; only files inside the folder')

    inside = copy_of(sharded, tmp_path / "inside")
    (inside / "sub").mkdir()
    (inside / first).rename(inside / "sub" / first)
    (inside / "link.safetensors").symlink_to(Path("sub") / first)
    rename_in_index(inside, first, "link.safetensors")
    assert load_hf_weights(debug_model, inside) > 0

    cache = tmp_path / "hub" / "models--org--tiny"  # the layout huggingface_hub downloads to
    (cache / "blobs").mkdir(parents=True)
    snapshot = cache / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for file in sharded.iterdir():
        shutil.copyfile(file, cache / "blobs" / f"sha-{file.name}")
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / f"sha-{file.name}")
    assert load_hf_weights(debug_model, snapshot) > 0


def lying_header(file: Path) -> None:
    """Rewrite a safetensors header so that one tensor claims twice its shape (its bytes unchanged)."""
    import struct

    raw = file.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2 * header[name]["shape"][0], *header[name]["shape"][1:]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


def test_init_from_missing_or_damaged_weight_files_are_one_line_naming_the_file(
    exported, sharded, debug_model, tmp_path: Path
) -> None:
    first = first_shard(sharded)

    def broken(name: str, damage, match: str, source: Path = sharded) -> None:
        folder = copy_of(source, tmp_path / name)
        damage(folder)
        refused(debug_model, folder, match)

    broken("missing", lambda f: (f / first).unlink(), rf"{INDEX} names {first}, which is not a file in the folder")
    broken("a-folder", lambda f: ((f / first).unlink(), (f / first).mkdir()), rf"names {first}, which is not a file")
    readable = rf"{first} is not a readable safetensors file \((.*)\); download or save the model again$"
    broken("truncated", lambda f: (f / first).write_bytes((f / first).read_bytes()[:-100]), readable)
    broken("header-only", lambda f: (f / first).write_bytes((f / first).read_bytes()[:30]), readable)
    broken("garbage", lambda f: (f / first).write_bytes(b"not a safetensors file " * 20), readable)
    broken("lying-header", lambda f: lying_header(f / first), readable)
    broken("empty", lambda f: (f / first).write_bytes(b""), readable)

    def tensor_elsewhere(folder: Path) -> None:
        index = json.loads((folder / INDEX).read_text())
        wrong = next(k for k, v in index["weight_map"].items() if v != first)
        index["weight_map"][wrong] = first
        (folder / INDEX).write_text(json.dumps(index))

    broken("elsewhere", tensor_elsewhere, rf"{INDEX} puts model\.\S+ in {first}, which does not hold it")
    broken("no-map", lambda f: (f / INDEX).write_text("[]"), rf"{INDEX} has no weight_map object")
    broken("bad-map", lambda f: (f / INDEX).write_text('{"weight_map": {"a": 3}}'), r"names 3 as a weight file")
    single = r"model.safetensors is not a readable safetensors file \(.*\)"
    broken("single", lambda f: (f / "model.safetensors").write_bytes(b"\x08" + bytes(20)), single, exported[0])
    broken(
        "single-truncated",
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-8]),
        single,
        exported[0],
    )


def test_init_from_config_json_must_be_an_object_of_valid_settings(exported, debug_model, tmp_path: Path) -> None:
    folder = exported[0]
    good = json.loads((folder / "config.json").read_text())
    cases = {
        "[1, 2]": r"config.json holds a JSON list, not an object of settings",
        '"llama"': r"config.json holds a JSON str, not an object of settings",
        "{not json": r"config.json is unreadable \(",
        json.dumps({k: v for k, v in good.items() if k != "hidden_size"}): r"config.json has no hidden_size; ",
        json.dumps({**good, "hidden_size": "64"}): r'config.json has hidden_size="64", not a positive integer$',
        json.dumps({**good, "num_attention_heads": 0}): r"has num_attention_heads=0, not a positive integer$",
        json.dumps({**good, "rms_norm_eps": [1]}): r"has rms_norm_eps=\[1\], not a number$",
        json.dumps({**good, "tie_word_embeddings": "no"}): r'has tie_word_embeddings="no", not true or false$',
        json.dumps({**good, "rope_parameters": [10000]}): r"has rope_parameters that is not an object$",
    }
    for i, (text, match) in enumerate(cases.items()):
        copy = copy_of(folder, tmp_path / str(i))
        (copy / "config.json").write_text(text)
        refused(debug_model, copy, match)


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_init_from_never_unpickles(exported, debug_model, tmp_path: Path) -> None:
    """A folder of pickled .bin weights is refused, and so is an index naming a pickle as a weight file; the
    pickle's code never runs (it would create a marker file, as it does when loaded with pickle)."""
    probe = tmp_path / "probe.bin"
    torch.save({"w": Payload(tmp_path / "probe-ran")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").exists()  # the payload works when unpickled

    marker = tmp_path / "ran"
    payload = {name: Payload(marker) for name in ("model.embed_tokens.weight", "lm_head.weight")}
    pickled = copy_of(exported[0], tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save(payload, pickled / "pytorch_model.bin")
    refused(debug_model, pickled, r"holds PyTorch \.bin weights only, which are pickled")

    indexed = copy_of(pickled, tmp_path / "indexed")
    names = [name for name, _ in debug_model.named_parameters()]
    (indexed / INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(names, "pytorch_model.bin")}))
    refused(debug_model, indexed, r"pytorch_model.bin is not a readable safetensors file")
    assert not marker.exists()


@pytest.mark.slow  # training processes
def test_train_refuses_a_folder_leading_out_or_damaged_in_one_line(exported, sharded, tmp_path: Path) -> None:
    """Through the real entry point: one line, exit 2, no traceback, nothing written."""
    folder, _, data = exported
    first = first_shard(sharded)
    dotdot = copy_of(sharded, tmp_path / "dotdot")
    rename_in_index(dotdot, first, f"../sharded-copy/{first}")
    truncated = copy_of(folder, tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:-64])
    for case, ending in (
        (
            dotdot,
            f'{INDEX} names "../sharded-copy/{first}" as a weight file; only files inside the folder load, named '
            "relative to it",
        ),
        (
            truncated,
            "model.safetensors is not a readable safetensors file (Error while deserializing header: "
            "incomplete metadata, file not fully covered); download or save the model again",
        ),
    ):
        proc = train_cli(f"run_dir={tmp_path / 'run'}", f"data.path={data}", f"model.init_from={case}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].endswith(f"model.init_from={case}: {ending}"), proc.stderr[-2000:]
        assert not (tmp_path / "run").exists()


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

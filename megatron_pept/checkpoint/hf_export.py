"""Export a checkpoint to a Hugging Face ``LlamaForCausalLM`` folder: ``config.json``, safetensors weights and a
tokenizer ``AutoTokenizer`` loads, read the same way by transformers 4.x and 5.x.

The model is rebuilt as the run built it (shape from the checkpoint's ``meta.json``, the method's conversion from its
saved config, the method's phase from its saved state) but with torch's SDPA attention whatever kernel the run
trained with (``model.attention``: every kernel computes the same function of the same weights, the kernel is no
Hugging Face setting, and a ``flash`` or ``te`` run exports where flash-attn and transformer-engine are not
installed; a kernel's saved state, such as the ``..._extra_state`` of older ``te`` checkpoints, is dropped
unused), the whole weights are read from the DCP shards of any number of ranks or, for a DeepSpeed run,
consolidated from its ZeRO partitions by DeepSpeed's own ``zero_to_fp32`` functions, and every low-rank layer is
replaced by the dense weight it applies (LoRA / ReLoRA: ``W + s B A``; DoRA: magnitude times the normalised
direction; bases in low precision dequantised to float).
Optimizer state is not read. Nothing is loaded with pickle. The weights and config.json then go through the
Hugging Face adapter (:func:`megatron_pept.models.hf.to_hf`), which keeps exactly transformers' parameters.

``config.json`` carries the keys of both transformers lines (5.x's ``dtype`` and ``rope_parameters`` beside 4.x's
``torch_dtype``, ``rope_theta`` and ``rope_scaling``); its ``max_position_embeddings`` is
``model.max_position_embeddings`` (null: 2048, or ``data.seq_len`` if larger), not the training length. The
tokenizer is the run's SentencePiece model converted, or its Hugging Face ``tokenizer.json`` carried as it is.

The folder is written under a new hidden name of its own beside the output (``.NAME.<random>``) and renamed into
place only when complete, so a failed or interrupted export leaves no partial model at the output, and two
exports never share a temporary folder. An existing non-empty output is replaced only when asked
(``overwrite``), after the new export is complete (one atomic exchange where the filesystem offers it); a symbolic
link, a file, or a folder that is, holds or lies inside the checkpoint is never an output.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import io
import json
import os
import pickle
import re
import secrets
import shutil
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_pept.checkpoint.export import load_full_tensors, read_meta
from megatron_pept.checkpoint.store import resolve_checkpoint
from megatron_pept.config import Config
from megatron_pept.errors import UserError
from megatron_pept.methods import build_method
from megatron_pept.models import build_model
from megatron_pept.models.attention import is_kernel_state
from megatron_pept.models.hf import DEFAULT_CONTEXT, declared_context, to_hf
from megatron_pept.models.llama import LlamaArgs
from megatron_pept.registry import config_from_dict
from megatron_pept.safe_paths import check_export_output

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEEPSPEED_TAG = "state"  # the tag DeepSpeedBackend.save_native saves under (its ``latest`` file names it too)


def dense_state_dict(checkpoint: Path) -> tuple[LlamaArgs, dict[str, torch.Tensor], dict[str, Any]]:
    """The plain LLaMA weights (HF names) a checkpoint's model applies, whole and in fp32, with its arguments
    (``attention`` is ``sdpa``, whatever kernel the run trained with: see the module docstring). A DeepSpeed
    checkpoint's model comes from its ZeRO files (:func:`deepspeed_model_state`), any other's from DCP."""
    meta = _run_meta(checkpoint)
    args = dataclasses.replace(LlamaArgs(**meta["model_args"]), attention="sdpa")
    cfg = _export_config(meta)
    model = build_model(args, device="meta")
    method = build_method(cfg.method, optim_cfg=cfg.optim, total_steps=cfg.train.steps, seed=cfg.train.seed)
    method.convert(model)
    model.to_empty(device="cpu")
    method_state = load_full_tensors(checkpoint, prefix="extra.method.") if method.state_dict() else {}
    if method_state:  # the saved phase decides which tensors the model holds (e.g. a quantised base)
        method.load_state_dict(method_state)
        if method.has_phases:
            method.apply_phase(model)
    if (checkpoint / "deepspeed").is_dir():
        state = deepspeed_model_state(checkpoint, model.state_dict())
    else:
        state = load_full_tensors(checkpoint, prefix="model.")
    state = {key: value for key, value in state.items() if not is_kernel_state(key)}  # never a weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rope_" not in k]:
        raise UserError(f"{checkpoint} does not match the model its meta.json describes ({(missing + unexpected)[0]})")
    dense = method.export_weights(model)
    return args, dense, meta


def _run_meta(checkpoint: Path) -> dict[str, Any]:
    meta = read_meta(checkpoint)
    if "model_args" not in meta or "config" not in meta:
        raise UserError(f"{checkpoint}/meta.json lacks the model description; was it written by megatron_pept?")
    return meta


def _export_config(meta: dict[str, Any]) -> Config:
    """The run's saved config, with ``model.attention=sdpa``: the export runs on any machine, whatever kernel (and
    whatever the checks of that kernel's settings) the run trained with."""
    raw = meta["config"]
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = {**raw, "model": {**raw["model"], "attention": "sdpa"}}
    return config_from_dict(raw)


def _weights_only_torch(allowed: list[type]) -> types.ModuleType:
    """``torch`` as DeepSpeed's ``zero_to_fp32`` sees it during an export: a module with torch's names, except
    that ``load`` unpickles nothing (``weights_only=True``, with only the few DeepSpeed classes its files hold
    allowed)."""

    def load(f: Any, map_location: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        with torch.serialization.safe_globals(allowed):
            return torch.load(f, map_location=map_location, weights_only=True, **kwargs)

    view = types.ModuleType("torch")
    view.__dict__.update(vars(torch))
    view.load = load
    return view


def deepspeed_model_state(checkpoint: Path, needed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model tensors (names of ``needed``, the model's ``state_dict``) of a DeepSpeed checkpoint, whole, on CPU.

    DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` (tag ``state``) consolidates them: the fp32
    master weights of the trained parameters from the optimizer partitions of every rank; under ZeRO-2/3 the frozen
    parameters (a ReLoRA layer's ``weight``), which its module-state files hold (whole under ZeRO-2, in per-rank
    fragments under ZeRO-3); and the persistent buffers (``lora_A0``/``lora_B0``, a quantised base's ``base_*``
    parts and master), floating ones widened to fp32, whole (ZeRO never partitions buffers). ZeRO-1 records no
    frozen parameters: those are taken from the module state in rank 0's file, which holds them whole (ZeRO-1 never
    partitions parameters). Its files are read with ``weights_only=True``: the functions run with a ``torch``
    whose ``load`` unpickles nothing.
    """
    folder = checkpoint / "deepspeed"
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils import zero_to_fp32
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        raise UserError(
            f"{checkpoint} is a DeepSpeed checkpoint; exporting it needs deepspeed: pip install deepspeed"
        ) from None
    safe_torch = _weights_only_torch([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])

    def cannot(reason: str) -> UserError:
        return UserError(
            f"{checkpoint}: DeepSpeed's partitions cannot be exported ({reason}); DeepSpeed's own script consolidates "
            f"the raw weights (adapters not merged; it unpickles, so only for a checkpoint you trust): python "
            f"{folder}/zero_to_fp32.py {folder} OUT --tag {DEEPSPEED_TAG} --safe_serialization"
        )

    original = zero_to_fp32.torch
    zero_to_fp32.torch = safe_torch
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)
            missing = [name for name in needed if name not in state]
            if missing:  # ZeRO-1: frozen parameters are only in the module state
                model_file = zero_to_fp32.get_model_state_files(str(folder / DEEPSPEED_TAG))[0]
                module = safe_torch.load(model_file, map_location="cpu")["module"]
                for name in missing:
                    value = module.get(name)
                    if torch.is_tensor(value) and value.shape == needed[name].shape:
                        state[name] = value
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, pickle.UnpicklingError) as err:
        lines = str(err).strip().splitlines()
        raise cannot((lines[-1] if lines else type(err).__name__)[:200]) from None
    finally:
        zero_to_fp32.torch = original
    missing = [name for name in needed if name not in state and "rope_" not in name]
    if missing:
        raise cannot(f"it holds no {missing[0]}")
    return state


def export_to_hf(
    checkpoint: str | Path,
    output: str | Path,
    *,
    dtype: str = "fp32",
    max_position_embeddings: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the Hugging Face folder for ``checkpoint`` (a checkpoint, a checkpoints folder or a run_dir).

    ``max_position_embeddings`` overrides the checkpoint's ``model.max_position_embeddings`` (the context the
    export declares; null: 2048, or the training ``data.seq_len`` if larger). ``output`` must be new or an empty
    folder; with ``overwrite`` a non-empty folder is replaced once the new export is complete."""
    try:
        import transformers
    except ImportError:
        raise UserError(
            "exporting needs the transformers package: pip install 'megatron_pept[hf]' (or pip install transformers)"
        ) from None
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype}")
    output = Path(output)
    replace = check_export_output(output, overwrite=overwrite)
    path = resolve_checkpoint(checkpoint)
    _check_apart(output, path)
    cfg = _export_config(_run_meta(path))
    if max_position_embeddings is not None:
        context = declared_context(
            max_position_embeddings,
            cfg.data.seq_len,
            source="--max-position-embeddings",
            fix=f"give {cfg.data.seq_len} or more",
        )
    else:
        context = declared_context(
            cfg.model.max_position_embeddings,
            cfg.data.seq_len,
            source=f"model.max_position_embeddings in {path}/meta.json",
            fix=f"export with --max-position-embeddings {max(DEFAULT_CONTEXT, cfg.data.seq_len)}",
        )
    # The staging folder is made before the weights are read, so an unwritable output costs no load.
    with _staged(output, replace=replace) as tmp:
        args, dense, meta = dense_state_dict(path)
        hf_config, hf_state = to_hf(args, dense, max_position_embeddings=context)
        hf_cfg = transformers.LlamaConfig(**hf_config, use_cache=True)
        tok_meta = meta.get("tokenizer", {})
        if tok_meta.get("eos_id") is not None:
            hf_cfg.eos_token_id = tok_meta["eos_id"]
        hf_cfg.bos_token_id = tok_meta.get("bos_id")
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(hf_cfg)
        hf.load_state_dict(hf_state, strict=True, assign=True)
        if args.tie_embeddings:
            hf.tie_weights()
        hf = hf.to(DTYPES[dtype])
        sp_model, hf_json = path / "tokenizer" / "tokenizer.model", path / "tokenizer" / "tokenizer.json"
        with _writing(output, replace=replace):
            hf.save_pretrained(tmp, safe_serialization=True)
            _write_config_for_both_lines(tmp / "config.json", rope_theta=args.rope_theta, dtype=DTYPES[dtype])
            if sp_model.is_file():
                _save_tokenizer(transformers, sp_model, tmp, bos_id=tok_meta.get("bos_id"), model_max_length=context)
            elif hf_json.is_file():
                _save_hf_tokenizer(
                    transformers,
                    hf_json,
                    tmp,
                    bos_id=tok_meta.get("bos_id"),
                    eos_id=tok_meta.get("eos_id"),
                    model_max_length=context,
                )
    return output


# -- where the export goes ------------------------------------------------------------------------------------------


def _check_apart(output: Path, checkpoint: Path) -> None:
    """The export may not be written into the checkpoint (its completion marker lists every file) nor replace a
    folder that holds it."""
    out, ckpt = output.resolve(), checkpoint.resolve()
    if out == ckpt or out in ckpt.parents or ckpt in out.parents:
        raise UserError(f"--output {output} overlaps the checkpoint {checkpoint}; give a folder outside it")


_FIXES = {
    errno.ENOSPC: "free some space there or choose another --output",
    errno.EDQUOT: "free some of your quota there or choose another --output",
    errno.EFBIG: "a file size limit (ulimit -f) is below the export's size: raise it or choose another --output",
    errno.EROFS: "choose a writable place for --output",
    errno.EACCES: "choose a place you may write for --output",
    errno.ENOTEMPTY: "it was filled while this export ran (another export?): give --overwrite or another --output",
    errno.EEXIST: "it was filled while this export ran (another export?): give --overwrite or another --output",
}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _io_errno(err: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one that safetensors' and tokenizers' Rust code name in
    their message ("... (os error 28)"); None for anything that is not an I/O failure."""
    if isinstance(err, OSError):
        return err.errno or 0
    found = _OS_ERROR.search(str(err))
    return int(found.group(1)) if found else None


def _cannot_write(output: Path, err: BaseException, *, replace: bool) -> UserError:
    code = _io_errno(err)
    reason = os.strerror(code) if code else (str(err).strip().splitlines() or [type(err).__name__])[-1]
    kept = f"{output} is unchanged" if replace else "nothing was left behind"
    return UserError(f"cannot write the export to {output}: {reason}; {_FIXES.get(code, 'check --output')} ({kept})")


@contextlib.contextmanager
def _writing(output: Path, *, replace: bool) -> Iterator[None]:
    """Failed writes (a full or read-only disk) become one line; any other failure is a bug and keeps its traceback."""
    try:
        yield
    except Exception as err:
        if isinstance(err, UserError) or _io_errno(err) is None:
            raise
        raise _cannot_write(output, err, replace=replace) from None


def _new_folder(parent: Path, prefix: str) -> Path:
    """A folder of a name no one else has, made here (unlike a fixed name, which may be someone's)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


@contextlib.contextmanager
def _staged(output: Path, *, replace: bool) -> Iterator[Path]:
    """A new folder beside ``output`` to write the export in; moved to ``output`` when the block completes, removed
    (with any parent folders made for it) when it fails. Only folders made here are ever removed."""
    made: list[Path] = []
    tmp: Path | None = None
    published = False
    try:
        with _writing(output, replace=replace):
            parent = Path(os.path.abspath(output)).parent
            missing = [parent, *parent.parents]
            missing = missing[: next(i for i, p in enumerate(missing) if p.exists() or p.is_symlink())]
            for folder in reversed(missing):
                folder.mkdir()
                made.append(folder)
            tmp = _new_folder(parent, f".{output.name}.")
        yield tmp
        with _writing(output, replace=replace):
            _publish(tmp, output, replace=replace)
        published = True
    finally:
        if not published:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            for folder in reversed(made):
                with contextlib.suppress(OSError):  # not empty: someone else's files arrived there meanwhile
                    folder.rmdir()


def _publish(tmp: Path, output: Path, *, replace: bool) -> None:
    """Move the finished export to ``output``. rename(2) replaces a missing or empty folder in one step; a
    non-empty one is exchanged with the new export in one step where the filesystem can (renameat2), else moved
    aside first, and deleted only once the new export is in place."""
    if not replace:
        os.rename(tmp, output)
        return
    if _exchange(tmp, output):
        shutil.rmtree(tmp, ignore_errors=True)  # it now holds the old export
        return
    old = _new_folder(output.parent, f".{output.name}.old.")
    try:
        os.rename(output, old)  # over the empty placeholder
    except OSError:
        old.rmdir()
        raise
    try:
        os.rename(tmp, output)
    except OSError:
        os.rename(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where this system or filesystem
    cannot, so the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # a C library without it (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _write_config_for_both_lines(path: Path, *, rope_theta: float, dtype: torch.dtype) -> None:
    """Complete the ``config.json`` transformers wrote with the other line's keys, all saying the same: the weights'
    dtype as ``dtype`` (5.x) and ``torch_dtype`` (4.x, and 5.x's old name for it), the RoPE base as
    ``rope_parameters`` (5.x) and ``rope_theta`` with ``rope_scaling: null`` (4.x: plain RoPE)."""
    config = json.loads(path.read_text())
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config["rope_parameters"] = {**(config.get("rope_parameters") or {}), "rope_type": "default"}
    config["rope_parameters"]["rope_theta"] = config["rope_theta"] = float(rope_theta)
    config["rope_scaling"] = None
    config["architectures"], config["model_type"] = ["LlamaForCausalLM"], "llama"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_tokenizer_config_for_both_lines(folder: Path, *, model_max_length: int | None) -> None:
    """``tokenizer_config.json`` in a form transformers 4.x and 5.x both read: the class ``PreTrainedTokenizerFast``
    (5.x writes ``TokenizersBackend``, unknown to 4.x) and extra special tokens as ``additional_special_tokens``
    (5.x writes a list under ``extra_special_tokens``, which 4.x reads as a dict of named tokens; 5.x reads
    ``additional_special_tokens`` as its old name). ``model_max_length``: the exported model's context."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, dict) and extra:  # named extra tokens: a dict in both lines
        config["extra_special_tokens"] = extra
    elif extra:
        config["additional_special_tokens"] = [t["content"] if isinstance(t, dict) else str(t) for t in extra]
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_hf_tokenizer(
    transformers: Any,
    file: Path,
    folder: Path,
    *,
    bos_id: int | None,
    eos_id: int | None,
    model_max_length: int | None = None,
) -> None:
    """Write the run's Hugging Face ``tokenizer.json`` for ``AutoTokenizer``, carried as it is (the same pipeline:
    ``AutoTokenizer`` encodes and decodes as ``tokenizers.Tokenizer`` does), with ``tokenizer_config.json`` naming
    its BOS and EOS (the tokens of the ids in meta.json: BOS only if the data was prepared with it). If the data
    has BOS but the pipeline does not add it, a warning says so (the model saw BOS before each document)."""
    import tokenizers

    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust library raises its own exception type
        raise UserError(f"{file} is not a Hugging Face tokenizer.json ({err}); the checkpoint is damaged") from None
    special: dict[str, str] = {}
    for key, token_id in (("bos_token", bos_id), ("eos_token", eos_id)):
        if token_id is None:
            continue
        token = backend.id_to_token(token_id)
        if token is None:
            raise UserError(
                f"{file} has no token of id {token_id}, the {key} of the checkpoint's meta.json: the tokenizer does "
                "not belong to this checkpoint's data"
            )
        special[key] = token
    unk = json.loads(file.read_text()).get("model", {}).get("unk_token")  # BPE and WordLevel models name one
    if isinstance(unk, str) and backend.token_to_id(unk) is not None:
        special["unk_token"] = unk
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(file), clean_up_tokenization_spaces=False, **special)
    tok.save_pretrained(folder)
    _write_tokenizer_config_for_both_lines(folder, model_max_length=model_max_length)
    if bos_id is not None and backend.encode("a").ids[:1] != [bos_id]:
        warnings.warn(
            f"the data was prepared with BOS ({special['bos_token']!r}) before each document, but {file.name} does "
            "not add it: prepend it to the exported tokenizer's ids (tokenizer.bos_token_id) when using the model",
            stacklevel=2,
        )


def _save_tokenizer(
    transformers: Any, model_file: Path, folder: Path, *, bos_id: int | None, model_max_length: int | None = None
) -> None:
    """Write the run's tokenizer for ``AutoTokenizer``: ``tokenizer.json`` (a ``tokenizers`` pipeline built from
    the SentencePiece model, :func:`~megatron_pept.data.tokenizer.sentencepiece_to_hf`), ``tokenizer_config.json``
    (``model_max_length``: the exported model's context) and a copy of ``tokenizer.model``. It adds BOS only if
    the data did (``bos_id``), never EOS.

    With a tokenizer trained under the default ``identity`` normalisation with byte fallback, ``AutoTokenizer``
    gives SentencePiece's ids for every text (BOS aside; text spelling "<s>" is read as the special token) and
    ``decode(ids, skip_special_tokens=True)`` returns the text. Other tokenizers (``nfkc``: the normaliser is only
    re-implemented, and its changes cannot be undone; unigram; no byte fallback) export with a warning naming what
    may differ. The class recorded is ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both load from
    ``tokenizer.json`` as written (transformers 5's ``LlamaTokenizer`` would rebuild its own pipeline, which drops
    the dummy prefix before a leading space).
    """
    from megatron_pept.data.tokenizer import hf_conversion_caveats, load_tokenizer, sentencepiece_to_hf

    sp = load_tokenizer(model_file).processor
    caveats = hf_conversion_caveats(model_file)
    if caveats:
        warnings.warn(
            "the exported tokenizer may not encode all text as the run's SentencePiece model did: "
            + "; ".join(caveats),
            stacklevel=2,
        )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_to_hf(model_file, add_bos=bos_id is not None),
        bos_token=sp.id_to_piece(sp.bos_id()),
        eos_token=sp.id_to_piece(sp.eos_id()),
        unk_token=sp.id_to_piece(sp.unk_id()),
        clean_up_tokenization_spaces=False,  # it would delete spaces before punctuation when decoding
    )
    tok.save_pretrained(folder)
    _write_tokenizer_config_for_both_lines(folder, model_max_length=model_max_length)
    shutil.copyfile(model_file, folder / "tokenizer.model")

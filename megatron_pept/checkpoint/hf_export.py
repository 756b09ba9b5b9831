"""Export a checkpoint to a Hugging Face ``LlamaForCausalLM`` folder: ``config.json``, safetensors weights and a
tokenizer ``AutoTokenizer`` loads.

The model is rebuilt exactly as the run built it (shape from the checkpoint's ``meta.json``, the method's
conversion from its saved config, the method's phase from its saved state), the whole weights are read from the
DCP shards of any number of ranks, and every low-rank layer is replaced by the dense weight it applies (LoRA /
ReLoRA: ``W + s B A``; DoRA: magnitude times the normalised direction; bases in low precision dequantised to
float). Optimizer state is not read. Nothing is loaded with pickle.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_pept.checkpoint.export import load_full_tensors, read_meta
from megatron_pept.checkpoint.store import resolve_checkpoint
from megatron_pept.config import config_from_dict
from megatron_pept.errors import UserError
from megatron_pept.methods import build_method
from megatron_pept.models import build_model
from megatron_pept.models.hf import hf_config_dict
from megatron_pept.models.llama import LlamaArgs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dense_state_dict(checkpoint: Path) -> tuple[LlamaArgs, dict[str, torch.Tensor], dict[str, Any]]:
    """The plain LLaMA weights (HF names) a checkpoint's model applies, whole and in fp32, with its arguments."""
    meta = read_meta(checkpoint)
    if "model_args" not in meta or "config" not in meta:
        raise UserError(f"{checkpoint}/meta.json lacks the model description; was it written by megatron_pept?")
    if (checkpoint / "deepspeed").is_dir():
        raise UserError(
            f"{checkpoint} is a DeepSpeed checkpoint; exporting those is not supported in this version "
            "(train with parallel.backend=fsdp2 or ddp to export directly)"
        )
    args = LlamaArgs(**meta["model_args"])
    cfg = config_from_dict(meta["config"])
    model = build_model(args, device="meta")
    method = build_method(cfg.method, optim_cfg=cfg.optim, total_steps=cfg.train.steps, seed=cfg.train.seed)
    method.convert(model)
    model.to_empty(device="cpu")
    method_state = load_full_tensors(checkpoint, prefix="extra.method.") if method.state_dict() else {}
    if method_state:  # the saved phase decides which tensors the model holds (e.g. a quantised base)
        method.load_state_dict(method_state)
        if method.has_phases:
            method.apply_phase(model)
    state = load_full_tensors(checkpoint, prefix="model.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rope_" not in k]:
        raise UserError(f"{checkpoint} does not match the model its meta.json describes ({(missing + unexpected)[0]})")
    dense = method.export_weights(model)
    return args, dense, meta


def export_to_hf(checkpoint: str | Path, output: str | Path, *, dtype: str = "fp32") -> Path:
    """Write the Hugging Face folder for ``checkpoint`` (a checkpoint, a checkpoints folder or a run_dir)."""
    try:
        import transformers
    except ImportError:
        raise UserError("exporting needs the transformers package: pip install transformers") from None
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype}")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise UserError(f"{output} exists and is not empty; choose a new folder (nothing is overwritten)")
    path = resolve_checkpoint(checkpoint)
    args, dense, meta = dense_state_dict(path)
    hf_cfg = transformers.LlamaConfig(**hf_config_dict(args), use_cache=True)
    tok_meta = meta.get("tokenizer", {})
    if tok_meta.get("eos_id") is not None:
        hf_cfg.eos_token_id = tok_meta["eos_id"]
    hf_cfg.bos_token_id = tok_meta.get("bos_id")
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(dense, strict=True, assign=True)
    if args.tie_embeddings:
        hf.tie_weights()
    hf = hf.to(DTYPES[dtype])
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp, safe_serialization=True)
    tokenizer_file = path / "tokenizer" / "tokenizer.model"
    if tokenizer_file.is_file():
        _save_tokenizer(transformers, tokenizer_file, tmp, bos_id=tok_meta.get("bos_id"))
    if output.exists():
        output.rmdir()
    tmp.rename(output)
    return output


def _save_tokenizer(transformers: Any, model_file: Path, folder: Path, *, bos_id: int | None) -> None:
    """Write the run's tokenizer for ``AutoTokenizer``: ``tokenizer.json`` (a ``tokenizers`` pipeline built from
    the SentencePiece model, :func:`~megatron_pept.data.tokenizer.sentencepiece_to_hf`), ``tokenizer_config.json``
    and a copy of ``tokenizer.model``. It adds BOS only if the data did (``bos_id``), never EOS.

    With a tokenizer trained under the default ``identity`` normalisation with byte fallback, ``AutoTokenizer``
    gives SentencePiece's ids for every text (BOS aside; text spelling "<s>" is read as the special token) and
    ``decode(ids, skip_special_tokens=True)`` returns the text. Other tokenizers (``nfkc``: the normaliser is only
    re-implemented, and its changes cannot be undone; unigram; no byte fallback) export with a warning naming what
    may differ. The class recorded is ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both load from
    ``tokenizer.json`` as written (transformers 5's ``LlamaTokenizer`` would rebuild its own pipeline, which drops
    the dummy prefix before a leading space).
    """
    import json
    import warnings

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
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes TokenizersBackend, unknown to 4.x
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(model_file, folder / "tokenizer.model")

"""GaLore AdamW with 8-bit moments (bitsandbytes' blockwise dynamic quantisation)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from megatron_pept.optim.galore.adamw import GaLoreAdamW
from megatron_pept.optim.galore.views import _View


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLore AdamW whose moments are stored in 8 bits (bitsandbytes' blockwise dynamic quantisation: a signed map
    for the first moment, an unsigned one for the second), dequantised for the update and re-quantised after.
    Runs on CPU and GPU (bitsandbytes >= 0.46)."""

    block_size = 256
    min_8bit_numel = 4096  # smaller states stay fp32, as in bitsandbytes' 8-bit optimizers

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        try:
            import bitsandbytes.functional as bnbf
        except Exception as err:
            raise ImportError(
                f"galore_8bit needs bitsandbytes ({type(err).__name__}: {err}); pip install 'megatron_pept[quant]'"
            ) from None
        self._bnbf = bnbf
        self._signed_map = bnbf.create_dynamic_map(signed=True)
        self._unsigned_map = bnbf.create_dynamic_map(signed=False)
        # The code tables on each device they were used on, moved there once (the per-layer optimizers split from
        # this one share the dictionary): a step copies nothing from the host.
        self._codes: dict[tuple[bool, torch.device], torch.Tensor] = {}
        super().__init__(params, **kwargs)

    def code(self, device: torch.device, *, signed: bool) -> torch.Tensor:
        """The signed (first moment) or unsigned (second moment) code table on ``device``."""
        key = (signed, device)
        if key not in self._codes:
            self._codes[key] = (self._signed_map if signed else self._unsigned_map).to(device)
        return self._codes[key]

    def _quantize(self, x: torch.Tensor, *, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.code(x.device, signed=signed)
        q, qstate = self._bnbf.quantize_blockwise(x.contiguous(), code=code, blocksize=self.block_size)
        return q, qstate.absmax

    def _dequantize(self, q: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, *, signed: bool) -> torch.Tensor:
        code = self.code(q.device, signed=signed)
        out = self._bnbf.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=self.block_size)
        return out.view(shape).float()

    def _init_inner_state(self, state: dict[str, Any], shape: torch.Size, like: torch.Tensor, group: dict) -> None:
        if shape.numel() < self.min_8bit_numel:
            super()._init_inner_state(state, shape, like, group)
            return
        zeros = torch.zeros(shape, dtype=torch.float32, device=like.device)
        state["exp_avg_q"], state["exp_avg_absmax"] = self._quantize(zeros, signed=True)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = self._quantize(zeros, signed=False)

    def _inner_update(self, state: dict[str, Any], grad: torch.Tensor, group: dict, param: _View) -> tuple:
        if "exp_avg" in state:
            return super()._inner_update(state, grad, group, param)
        exp_avg = self._dequantize(state["exp_avg_q"], state["exp_avg_absmax"], grad.shape, signed=True)
        exp_avg_sq = self._dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], grad.shape, signed=False)
        direction, step_size = self._adam_direction(exp_avg, exp_avg_sq, grad, group, float(state["step"]))
        state["exp_avg_q"], state["exp_avg_absmax"] = self._quantize(exp_avg, signed=True)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = self._quantize(exp_avg_sq, signed=False)
        return direction, step_size

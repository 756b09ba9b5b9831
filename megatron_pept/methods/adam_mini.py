"""Adam-mini (Zhang et al. 2024): every weight trains; one second moment per block of parameters.

| method | optimizer |
|---|---|
| ``adam_mini`` | Adam-mini: one second moment per head (queries, keys), per row (values, outputs, MLP), full Adam for
  the embedding and the LM head |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from megatron_pept.methods.base import Method, MethodSettings
from megatron_pept.optim.adam_mini import AdamMini


@dataclass
class AdamMiniSettings(MethodSettings):
    """Adam-mini's settings."""

    family = "Adam-mini"

    adam_mini_partition: Literal["neuron", "tensor"] = "neuron"
    """adam_mini: the blocks sharing one second moment outside queries and keys (one per head in both) and the
    embedding and LM head (full Adam in both). neuron: one per output row of v_proj, o_proj and the MLP matrices
    (the adam-mini package's partition); tensor: one per weight tensor, as the Approximations paper describes
    Adam-mini ("the default PyTorch partition for the rest of the model")."""


class AdamMiniMethod(Method):
    """Adam-mini over every parameter (see :mod:`megatron_pept.optim.adam_mini`). Queries and keys: one block per
    head; embedding and LM head: full Adam; other matrices: one block per output row (``method.adam_mini_partition
    =neuron``, the Adam-mini paper's partition) or per tensor (``tensor``, the Approximations paper's description);
    norm weights: one block per tensor."""

    name = "adam_mini"
    settings_class = AdamMiniSettings
    config_keys = ("adam_mini_partition",)
    resume_keys = ("adam_mini_partition",)  # the blocks that share a second moment
    QUERY_KEY = ("q_proj", "k_proj")
    FULL_ADAM = ("embed_tokens", "lm_head")

    def param_groups(self, model: nn.Module) -> list[dict]:
        args = model.args
        head_numel = args.hidden_size * args.head_dim  # one head's rows of q_proj / k_proj
        wd = self.optim_cfg.weight_decay
        groups = []
        for name, p in self.trainable_parameters(model):
            leaf = name.rsplit(".", 2)[-2] if "." in name else name
            if any(key in name for key in self.FULL_ADAM):
                block = {"block": "adam"}
            elif leaf in self.QUERY_KEY:
                block = {"block": "head", "head_numel": head_numel}
            elif p.ndim >= 2 and self.cfg.adam_mini_partition == "neuron":
                block = {"block": "row"}
            else:
                block = {"block": "tensor"}
            decay = 0.0 if ("norm" in name or p.ndim < 2) else wd
            groups.append({"params": [p], "name": name, "weight_decay": decay, **block})
        return groups

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.optim_cfg
        return AdamMini(self.param_groups(model), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

"""The Muon family: every weight trains; the hidden matrices' updates are orthogonalised.

| method | optimizer of the hidden matrices |
|---|---|
| ``muon`` | Muon: Nesterov momentum orthogonalised by 5 quintic Newton-Schulz steps (in bf16), scaled to AdamW's RMS |
| ``normuon`` | NorMuon: Muon's update normalised per neuron (row) by a second moment, then rescaled |
| ``dion`` | Dion: a rank-``r`` orthonormal update from one power iteration per step (randomized Cholesky QR), the rest
  of the momentum kept by error feedback |

The matrices of the attention and MLP projections (``method.target_modules``) are orthogonalised; embeddings, the
LM head, norms and biases train with AdamW at the same learning rate (``method.muon_lr_adjust=match_rms_adamw``, the
default, scales each matrix's update to AdamW's RMS of about 0.2, so AdamW's learning rate and weight decay
transfer). See :mod:`megatron_pept.optim.muon` for the arithmetic and how it runs on every backend.

Scalars under ``muon/``: ``orthogonalize_seconds`` (this rank's Newton-Schulz or Dion time in the step: under
FSDP2 and ZeRO each rank orthogonalises its share of the matrices; on CUDA, timed by events and read one step later
without waiting, the previous step's), ``update_rms`` (the root mean square, over the
orthogonalised matrices, of each one's update RMS per unit of learning rate: 0.2 with ``match_rms_adamw``), and for
``dion`` ``residual_norm`` (the Frobenius norm, over every matrix, of ``B - P R^T``: what the rank-``r`` step left
in the momentum).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from megatron_pept.config import Config
from megatron_pept.errors import ConfigError
from megatron_pept.methods.base import Method, MethodSettings, StepEnd, require
from megatron_pept.methods.relora import LOWRANK_TARGETS, matches_target
from megatron_pept.optim.muon import OrthogonalOptimizer
from megatron_pept.optim.projector import divide_exactly
from megatron_pept.sharding import optimizer_protocol

logger = logging.getLogger("megatron_pept")


@dataclass
class MuonSettings(MethodSettings):
    """The Muon family's settings (muon, normuon, dion)."""

    family = "Muon family"

    target_modules: list[str] = field(default_factory=lambda: list(LOWRANK_TARGETS))
    """Linear layers whose weights are orthogonalised: glob patterns matched against the module's name or its last
    component; embeddings, norms, biases and the LM head (unless named) train with AdamW."""
    muon_momentum: float = 0.95
    """muon, normuon: the momentum's decay (torch.optim.Muon's ``momentum``); dion: its mu (the share of the
    low-rank part error feedback keeps)."""
    muon_nesterov: bool = True
    """muon, normuon: orthogonalise the Nesterov combination ``(1 - mu) G + mu B`` (torch.optim.Muon's default)
    instead of the momentum itself."""
    ns_steps: int = 5
    """muon, normuon: Newton-Schulz iterations."""
    ns_dtype: Literal["bf16", "fp32"] = "bf16"
    """muon, normuon: the dtype Newton-Schulz iterates in (bf16 as torch.optim.Muon; fp32 costs more, see
    docs/benchmarks.md)."""
    muon_lr_adjust: Literal["match_rms_adamw", "original"] = "match_rms_adamw"
    """How the learning rate is scaled per matrix. match_rms_adamw: the update gets AdamW's RMS of about 0.2
    (Moonlight's 0.2 sqrt(max(m, n)) for muon, the paper's RMS of 0.2 for normuon, 0.2 sqrt(mn / r) for dion), so
    optim.lr and optim.weight_decay tuned for AdamW transfer. original: Keller Jordan's sqrt(max(1, m / n)) (muon;
    normuon keeps the orthogonalised update's norm, as its official code) and the Dion paper's sqrt(m / n)."""
    normuon_beta2: float = 0.95
    """normuon: decay of the per-neuron second moment."""
    rank: int = 128
    """dion: the rank of each step's update (at most the matrix's smaller side); see rank_fraction."""
    rank_fraction: float | None = None
    """dion: the rank as this fraction of each matrix's smaller side (0.25: width / 4 for the square attention
    matrices); null: method.rank."""

    def validate(self) -> None:
        require(bool(self.target_modules), "method.target_modules is empty; name at least one linear layer pattern")
        require(0 <= self.muon_momentum < 1, f"method.muon_momentum must be in [0, 1); got {self.muon_momentum}")
        require(1 <= self.ns_steps < 100, f"method.ns_steps must be in [1, 100); got {self.ns_steps}")
        require(0 <= self.normuon_beta2 < 1, f"method.normuon_beta2 must be in [0, 1); got {self.normuon_beta2}")
        require(self.rank >= 1, f"method.rank must be >= 1; got {self.rank}")
        if self.rank_fraction is not None:
            require(
                0 < self.rank_fraction <= 1,
                f"method.rank_fraction must be in (0, 1] (or null for method.rank); got {self.rank_fraction}",
            )


class MuonFamily(Method):
    """Orthogonalised updates of the hidden matrices (``algorithm``), AdamW for the rest."""

    algorithm: ClassVar[str]
    settings_class = MuonSettings
    config_keys: ClassVar[tuple[str, ...]] = (
        "target_modules",
        "muon_momentum",
        "muon_nesterov",
        "ns_steps",
        "ns_dtype",
        "muon_lr_adjust",
    )
    resume_keys = ("target_modules",)  # which parameters hold momentum (and NorMuon's or Dion's state)

    def __init__(self, cfg: MuonSettings, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self._logged = False

    @classmethod
    def validate(cls, settings: MuonSettings, cfg: Config) -> None:
        settings.validate()
        if cfg.optim.per_layer and cfg.parallel.backend == "fsdp2" and cls.algorithm != "dion":
            raise ConfigError(
                f"method.name={cls.name} with optim.per_layer=true cannot run with parallel.backend=fsdp2: each "
                "matrix is orthogonalised whole on one owner rank, which a backward hook of one shard cannot wait "
                "for; use parallel.backend=ddp or single for per-layer updates, method.name=dion (its power "
                "iteration runs on each rank's rows), or optim.per_layer=false"
            )

    def orthogonal_settings(self) -> dict[str, Any]:
        """The settings of the orthogonalised group (keys of :data:`~megatron_pept.optim.muon.MUON_GROUP_DEFAULTS`),
        read from the ``method.*`` keys this method declares (the others keep their defaults)."""
        c, read = self.cfg, set(self.config_keys)
        keys = {
            "momentum": "muon_momentum",
            "nesterov": "muon_nesterov",
            "ns_steps": "ns_steps",
            "ns_dtype": "ns_dtype",
            "lr_adjust": "muon_lr_adjust",
            "normuon_beta2": "normuon_beta2",
            "dion_rank": "rank",
            "dion_rank_fraction": "rank_fraction",
        }
        return {
            "algorithm": self.algorithm,
            **{group_key: getattr(c, key) for group_key, key in keys.items() if key in read},
            "seed": self.seed,
        }

    def targets(self, model: nn.Module) -> tuple[set[nn.Parameter], list[str]]:
        """The weights to orthogonalise, and the names of parameters the patterns named that cannot be (not 2-D
        weights of a linear layer): those train with AdamW."""
        chosen, refused = set(), []
        for name, module in model.named_modules():
            if not name or not matches_target(name, self.cfg.target_modules):
                continue
            if name == "lm_head" and "lm_head" not in self.cfg.target_modules:
                continue  # only when named explicitly
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter) or not weight.requires_grad:
                continue
            if isinstance(module, nn.Linear) and weight.ndim == 2:
                chosen.add(weight)
            else:
                refused.append(f"{name}.weight {tuple(weight.shape)}")
        return chosen, refused

    def param_groups(self, model: nn.Module) -> list[dict]:
        wd = self.optim_cfg.weight_decay
        targets, refused = self.targets(model)
        orthogonal, decay, no_decay, names = [], [], [], {}
        for name, p in self.trainable_parameters(model):
            names[p] = name
            if p in targets:
                orthogonal.append(p)
            elif p.ndim >= 2:
                decay.append(p)
            else:
                no_decay.append(p)
        if not self._logged:
            self._logged = True
            logger.info(
                "method.name=%s orthogonalises %d matrices; %d other parameters (embeddings, LM head, norms) train "
                "with AdamW",
                self.name,
                len(orthogonal),
                len(decay) + len(no_decay),
            )
            if refused:
                logger.warning(
                    "method.target_modules names %d parameters %s cannot orthogonalise (not the 2-D weight of a linear "
                    "layer), e.g. %s: they train with AdamW",
                    len(refused),
                    self.name,
                    refused[0],
                )
            if self.optim_cfg.state_dtype != "fp32":
                logger.warning(
                    "optim.state_dtype=%s is ignored by method.name=%s: its momentum and AdamW moments are fp32",
                    self.optim_cfg.state_dtype,
                    self.name,
                )
        groups = [
            {"params": decay, "weight_decay": wd},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": orthogonal, **self.orthogonal_settings(), "weight_decay": wd},
        ]
        return [g for g in groups if g["params"]]

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.optim_cfg
        names = {p: n for n, p in self.trainable_parameters(model)}
        return OrthogonalOptimizer(
            self.param_groups(model),
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            param_names=names,
        )

    def on_step_end(self, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> StepEnd:
        """The step's statistics as scalars (tensors stay on the device until the trainer logs them)."""
        stats = optimizer_protocol(optimizer).step_stats()
        end = StepEnd()
        if not stats or not stats["matrices"]:
            return end
        end.scalars["muon/orthogonalize_seconds"] = float(stats["ortho_seconds"])
        end.scalars["muon/update_rms"] = divide_exactly(stats["update_ms_sum"], stats["matrices"]).sqrt()
        if self.algorithm == "dion":
            squares = stats["dion_residual_sq"]
            end.scalars["muon/residual_norm"] = squares.sqrt() if torch.is_tensor(squares) else squares**0.5
        return end


class Muon(MuonFamily):
    name = "muon"
    algorithm = "muon"


class NorMuon(MuonFamily):
    name = "normuon"
    algorithm = "normuon"
    config_keys = (*MuonFamily.config_keys, "normuon_beta2")


class Dion(MuonFamily):
    name = "dion"
    algorithm = "dion"
    config_keys = (
        "target_modules",
        "muon_momentum",
        "muon_lr_adjust",
        "rank",
        "rank_fraction",
    )
    resume_keys = ("target_modules", "rank", "rank_fraction")  # the right factor's shape


MUON_METHODS = (Muon, NorMuon, Dion)

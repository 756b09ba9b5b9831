"""The GaLore family, APOLLO and Fira: every weight trains; only the optimizer changes.

| method | optimizer |
|---|---|
| ``galore`` | GaLore-AdamW: Adam moments in the rank-``r`` projection, refreshed every ``update_proj_gap`` steps |
| ``galore_ef`` | + error feedback: the residual ``G - P P^T G`` (times ``ef_weight``) joins the next gradient |
| ``galore_dynamic`` | refresh at 0, ``dynamic_first``, then each refresh step x``dynamic_growth``, gap <= cap |
| ``galore_dynamic_ef`` | both |
| ``galore_8bit`` | GaLore-AdamW with 8-bit moments (bitsandbytes blockwise quantisation) |
| ``galore_adafactor`` | GaLore with Adafactor (factored second moments) in the projection |
| ``apollo`` | APOLLO: Adam moments of a random rank-``r`` projection give a scaling factor per channel, applied to
  the raw gradient; norm-growth limiter |
| ``apollo_mini`` | APOLLO-Mini: the same at rank 1 with one factor per tensor (scale 128) |
| ``fira`` | Fira: GaLore plus the projection's residual, scaled per channel by the projected Adam update's norm
  ratio; norm-growth limiter |

GaLore projects the targeted matrices (``method.target_modules``, default every attention and MLP projection);
embeddings, norms and the LM head use the same optimizer unprojected, as galore-torch does.

Scalars under ``galore/``: ``refreshes`` (projector refreshes so far, all matrices), ``svd_seconds`` (time spent
computing projectors so far), ``subspace_overlap`` (mean ``||P_old^T P_new||_F^2 / r`` over the matrices refreshed
in a step; 1 = same subspace), ``ef_residual_norm`` (global norm of the error-feedback residuals); APOLLO and
Fira add ``scaling_factor`` (mean over the matrices of their mean scaling factor in the step), ``limited_fraction``
(share of the matrices whose update the norm-growth limiter shrank in the step) and ``limiter_activations`` (how
many times it did so far, all matrices).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from megatron_pept.config import OptimConfig
from megatron_pept.methods.base import Method, MethodSettings, PlannedEvents, StepEnd, require
from megatron_pept.methods.relora import LOWRANK_TARGETS, matches_target
from megatron_pept.optim.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from megatron_pept.optim.projector import divide_exactly
from megatron_pept.sharding import optimizer_protocol

logger = logging.getLogger("megatron_pept")


@dataclass
class ProjectionSettings(MethodSettings):
    """The settings every method that projects gradients shares (the GaLore family, APOLLO and Fira)."""

    family = "GaLore family, APOLLO, Fira"

    rank: int = 128
    """Rank of the projection: GaLore's and Fira's top singular subspace, APOLLO's random projection
    (apollo_mini's is 1)."""
    target_modules: list[str] = field(default_factory=lambda: list(LOWRANK_TARGETS))
    """Linear layers whose weights are projected: glob patterns matched against the module's name or its last
    component; embeddings, norms (and the LM head, unless named) use the same optimizer unprojected."""
    galore_scale: float = 0.25
    """GaLore family and fira: the projected-back update is multiplied by this (GaLore's alpha; Fira's alpha,
    which its residual G - alpha P P^T G uses too, as the fira package computes it)."""
    update_proj_gap: int = 200
    """GaLore family: steps between projector refreshes (galore, galore_ef, galore_8bit, galore_adafactor, fira;
    apollo and apollo_mini: steps between redraws of the random projection)."""
    svd: Literal["full", "randomized"] = "full"
    """GaLore family: projector from a full SVD, or from a randomized range finder (far cheaper on big matrices)."""
    svd_oversample: int = 8
    """Randomized range finder: extra sketch columns beyond the rank."""
    svd_power_iters: int = 1
    """Randomized range finder: power iterations (each sharpens the subspace at the cost of two matmuls)."""
    projector_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """GaLore family and fira: the dtype the projector is held in (computed in fp32, used upcast). auto: the
    weights' (bf16 with train.param_dtype=bf16, as galore-torch holds it in its bf16 gradient's dtype: half the
    bytes, 1.75 GB of a 7B model's at rank 1024), else fp32."""

    def validate(self) -> None:
        require(self.rank >= 1, f"method.rank must be >= 1; got {self.rank}")
        require(bool(self.target_modules), "method.target_modules is empty; name at least one linear layer pattern")
        require(self.galore_scale > 0, f"method.galore_scale must be > 0; got {self.galore_scale}")
        require(self.update_proj_gap >= 1, f"method.update_proj_gap must be >= 1; got {self.update_proj_gap}")
        require(self.svd_oversample >= 0, f"method.svd_oversample must be >= 0; got {self.svd_oversample}")
        require(self.svd_power_iters >= 0, f"method.svd_power_iters must be >= 0; got {self.svd_power_iters}")


@dataclass
class GaLoreSettings(ProjectionSettings):
    """The GaLore family's settings (galore, galore_ef, galore_dynamic, galore_dynamic_ef, galore_8bit,
    galore_adafactor)."""

    family = "GaLore family"

    ef_weight: float = 0.2
    """galore_ef, galore_dynamic_ef: weight of the residual G - P P^T G fed back into the next step's gradient
    (the Approximations paper uses 0.1 and 0.2)."""
    dynamic_first: int = 200
    """galore_dynamic(_ef): step of the first projector refresh after the initial one."""
    dynamic_growth: float = 1.5
    """galore_dynamic(_ef): growth factor of the schedule (see dynamic_rule); the paper's 1.5."""
    dynamic_cap: int = 2500
    """galore_dynamic(_ef): the largest gap between refreshes; once reached, every dynamic_cap steps."""
    dynamic_rule: Literal["step", "gap"] = "step"
    """galore_dynamic(_ef): step = each refresh step is dynamic_growth times the previous one (the Approximations
    paper's update_step = update_step + 0.5 * update_step: 0, 200, 300, 450, ..., 15 refreshes in 20k steps);
    gap = each gap is dynamic_growth times the previous one (0, 200, 500, 950, ..., 13 refreshes; earlier
    versions of this project)."""
    adafactor_beta1: float | None = None
    """galore_adafactor: first-moment decay, or null for none (Adafactor's default)."""

    def validate(self) -> None:
        super().validate()
        require(self.ef_weight >= 0, f"method.ef_weight must be >= 0; got {self.ef_weight}")
        require(self.dynamic_first >= 1, f"method.dynamic_first must be >= 1; got {self.dynamic_first}")
        require(
            self.dynamic_growth > 1.0,
            "method.dynamic_growth must be > 1 (for a fixed gap use galore with method.update_proj_gap); got "
            f"{self.dynamic_growth}",
        )
        require(self.dynamic_cap >= 1, f"method.dynamic_cap must be >= 1; got {self.dynamic_cap}")
        if self.adafactor_beta1 is not None:
            require(
                0 <= self.adafactor_beta1 < 1, f"method.adafactor_beta1 must be in [0, 1); got {self.adafactor_beta1}"
            )


@dataclass
class ApolloFiraSettings(ProjectionSettings):
    """APOLLO's, APOLLO-Mini's and Fira's settings: a projection, scaled updates and the norm-growth limiter."""

    family = "APOLLO, Fira"

    apollo_scale: float | None = None
    """apollo, apollo_mini: the scaled gradient is multiplied by sqrt(apollo_scale) (apollo-torch's `scale`, the
    APOLLO scripts' --apollo_scale); null: 1 for apollo, 128 for apollo_mini (the paper's sqrt(128) multiplier)."""
    norm_growth_limit: float = 1.01
    """apollo, apollo_mini, fira: Fira's norm-growth limiter; an update (APOLLO: the scaled gradient; Fira: the
    scaled residual) whose norm grew more than this factor over the previous step's is scaled down to that growth
    (both papers: 1.01); 0 turns it off."""

    def validate(self) -> None:
        super().validate()
        require(
            self.apollo_scale is None or self.apollo_scale > 0,
            f"method.apollo_scale must be > 0 (or null); got {self.apollo_scale}",
        )
        require(
            self.norm_growth_limit == 0 or self.norm_growth_limit > 1,
            f"method.norm_growth_limit must be > 1 (or 0 to turn the limiter off); got {self.norm_growth_limit}",
        )


class GaLoreMethod(Method):
    optimizer_kind: ClassVar[str] = "adamw"
    error_feedback: ClassVar[bool] = False
    dynamic: ClassVar[bool] = False
    update_rule: ClassVar[str] = "galore"
    """How the projected moments make the update (:mod:`megatron_pept.optim.galore`): galore, apollo or fira."""
    settings_class = GaLoreSettings
    config_keys = (
        "rank",
        "target_modules",
        "galore_scale",
        "update_proj_gap",
        "svd",
        "svd_oversample",
        "svd_power_iters",
        "projector_dtype",
    )
    DYNAMIC_KEYS = ("dynamic_first", "dynamic_growth", "dynamic_cap", "dynamic_rule")
    resume_keys = ("rank", "target_modules")  # the projector's and the projected moments' shapes

    def __init__(self, cfg: ProjectionSettings, *, optim_cfg: OptimConfig, total_steps: int, seed: int = 0) -> None:
        super().__init__(cfg, optim_cfg=optim_cfg, total_steps=total_steps, seed=seed)
        self.refreshes = 0
        self.svd_seconds = 0.0
        self.limiter_activations = 0
        self._rank_checked = False  # the clamped-rank warning is given once

    @classmethod
    def planned_events(cls, settings: ProjectionSettings) -> PlannedEvents:
        """Refreshes (a new projector: SVD, range finder or a redrawn random one) at steps 0 and 2."""
        gap = {"dynamic_first": 2} if "dynamic_first" in cls.config_keys else {"update_proj_gap": 2}
        return PlannedEvents(overrides=gap, refresh_steps=(0, 2))

    def galore_targets(self, model: nn.Module) -> set[nn.Parameter]:
        return {
            module.weight
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and (name != "lm_head" or "lm_head" in self.cfg.target_modules)  # only when named explicitly
            and module.weight.requires_grad
            and matches_target(name, self.cfg.target_modules)
        }

    def projected_settings(self) -> dict[str, Any]:
        """The settings of the projected parameter group (keys of :data:`~megatron_pept.optim.galore.
        GALORE_GROUP_DEFAULTS`), read from the ``method.*`` keys this method declares."""
        c = self.cfg
        # Only the keys this method declares are read (a dynamic schedule has no fixed gap, a static one no growth).
        schedule = (
            dict(
                dynamic_first=c.dynamic_first,
                dynamic_growth=c.dynamic_growth,
                dynamic_cap=c.dynamic_cap,
                dynamic_rule=c.dynamic_rule,
            )
            if self.dynamic
            else dict(update_proj_gap=c.update_proj_gap)
        )
        return dict(
            rank=c.rank,
            scale=c.galore_scale,
            proj_type="std",
            dynamic_gap=self.dynamic,
            **schedule,
            ef_weight=c.ef_weight if self.error_feedback else 0.0,
            svd=c.svd,
            svd_oversample=c.svd_oversample,
            svd_power_iters=c.svd_power_iters,
            projector_dtype=c.projector_dtype,
            seed=self.seed,
        )

    def param_groups(self, model: nn.Module) -> list[dict]:
        wd = self.optim_cfg.weight_decay
        settings = self.projected_settings()
        rank = settings["rank"]
        targets = self.galore_targets(model)
        if not self._rank_checked:
            self._rank_checked = True
            if self.optim_cfg.state_dtype != "fp32":
                logger.warning(
                    "optim.state_dtype=%s is ignored by method.name=%s: the GaLore family's optimizers keep their own "
                    "moments (fp32; 8-bit in galore_8bit and q_galore; factored in galore_adafactor)",
                    self.optim_cfg.state_dtype,
                    self.name,
                )
            small = [tuple(p.shape) for p in targets if min(p.shape) < rank]
            if small:
                logger.warning(
                    "method.rank=%d exceeds the smaller side of %d of the %d projected matrices (e.g. %dx%d): they are "
                    "projected at that side's size instead, so their optimizer state is not compressed",
                    rank,
                    len(small),
                    len(targets),
                    *small[0],
                )
        projected, decay, no_decay = [], [], []
        for _, p in self.trainable_parameters(model):
            if p in targets:
                projected.append(p)
            elif p.ndim >= 2:
                decay.append(p)
            else:
                no_decay.append(p)
        groups = [
            {"params": decay, "weight_decay": wd},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": projected, **settings, "weight_decay": wd},
        ]
        return [g for g in groups if g["params"]]

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.optim_cfg
        groups = self.param_groups(model)
        names = {p: n for n, p in self.trainable_parameters(model)}  # seeds random projections
        if self.optimizer_kind == "adafactor":
            return GaLoreAdafactor(
                groups, lr=o.lr, beta1=self.cfg.adafactor_beta1, weight_decay=o.weight_decay, param_names=names
            )
        cls = GaLoreAdamW8bit if self.optimizer_kind == "adamw8bit" else GaLoreAdamW
        return cls(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, param_names=names)

    def on_step_end(self, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> StepEnd:
        """The step's statistics as scalars: counts and times kept on the host are floats; the rest are 0-d tensors
        on the device (float64, the values the host arithmetic gave when they were read here), which the trainer
        reads once per ``train.log_interval``: no step waits for the device."""
        stats = optimizer_protocol(optimizer).step_stats()
        end = StepEnd()
        if not stats:
            return end
        self.refreshes += stats["refreshes"]
        self.svd_seconds += stats["svd_seconds"]
        end.scalars["galore/refreshes"] = float(self.refreshes)
        end.scalars["galore/svd_seconds"] = self.svd_seconds
        if stats["overlaps"]:  # a list of tensors, made on refresh steps
            end.scalars["galore/subspace_overlap"] = divide_exactly(sum(stats["overlaps"]), len(stats["overlaps"]))
        if self.error_feedback:
            squares = stats["ef_residual_sq"]
            end.scalars["galore/ef_residual_norm"] = squares.sqrt() if torch.is_tensor(squares) else squares**0.5
        scaled = stats["scaled_matrices"]
        if scaled:  # the sum of the factors is then a tensor; the limiter's count is one once the limiter ran
            total = stats["scaling_factor_sum"].double()
            limited = stats["limited_matrices"]
            limited = limited.double() if torch.is_tensor(limited) else torch.full_like(total, limited)
            self.limiter_activations = self.limiter_activations + limited
            end.scalars["galore/scaling_factor"] = divide_exactly(total, scaled)
            end.scalars["galore/limited_fraction"] = divide_exactly(limited, scaled)
            end.scalars["galore/limiter_activations"] = self.limiter_activations  # a new tensor each step
        return end

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"refreshes": torch.tensor(self.refreshes), "svd_seconds": torch.tensor(self.svd_seconds)}
        if self.update_rule != "galore":  # read on the host here, at a checkpoint (an int64 count, as before)
            state["limiter_activations"] = torch.tensor(int(self.limiter_activations))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.refreshes, self.svd_seconds = int(state["refreshes"]), float(state["svd_seconds"])
        self.limiter_activations = int(state.get("limiter_activations", 0))


class GaLore(GaLoreMethod):
    name = "galore"
    resumes_from = ("galore_dynamic",)  # the same state; only the refresh schedule differs


class GaLoreEF(GaLoreMethod):
    name = "galore_ef"
    error_feedback = True
    resumes_from = ("galore_dynamic_ef",)
    config_keys = (*GaLoreMethod.config_keys, "ef_weight")


class GaLoreDynamic(GaLoreMethod):
    name = "galore_dynamic"
    dynamic = True
    resumes_from = ("galore",)
    config_keys = (*(k for k in GaLoreMethod.config_keys if k != "update_proj_gap"), *GaLoreMethod.DYNAMIC_KEYS)


class GaLoreDynamicEF(GaLoreMethod):
    name = "galore_dynamic_ef"
    dynamic = True
    error_feedback = True
    resumes_from = ("galore_ef",)
    config_keys = (
        *(k for k in GaLoreMethod.config_keys if k != "update_proj_gap"),
        *GaLoreMethod.DYNAMIC_KEYS,
        "ef_weight",
    )


class GaLore8bit(GaLoreMethod):
    name = "galore_8bit"
    optimizer_kind = "adamw8bit"


class GaLoreAdafactorMethod(GaLoreMethod):
    name = "galore_adafactor"
    optimizer_kind = "adafactor"
    config_keys = (*GaLoreMethod.config_keys, "adafactor_beta1")
    resume_keys = (*GaLoreMethod.resume_keys, "adafactor_beta1")  # whether a first moment is kept at all


class Fira(GaLoreMethod):
    """Fira (Chen et al. 2024): GaLore's projected AdamW update plus the residual ``G - scale * P P^T G`` scaled
    per channel by ``||U|| / ||R||`` of the projected update ``U`` and gradient ``R``, with the norm-growth limiter
    on the scaled residual (as the fira package computes it; see :mod:`megatron_pept.optim.galore`)."""

    name = "fira"
    update_rule = "fira"
    settings_class = ApolloFiraSettings
    config_keys = (*GaLoreMethod.config_keys, "norm_growth_limit")

    def projected_settings(self) -> dict[str, Any]:
        return {
            **super().projected_settings(),
            "update_rule": self.update_rule,
            "norm_growth_limit": self.cfg.norm_growth_limit,
        }


class Apollo(GaLoreMethod):
    """APOLLO (Zhu et al. 2025): Adam moments of a random Gaussian projection of the gradient (rank
    ``method.rank``, redrawn every ``method.update_proj_gap`` steps from a seed of the parameter's name and the
    refresh count), used only for a scaling factor per channel, applied to the raw gradient; norm-growth limiter;
    the update multiplied by ``sqrt(method.apollo_scale)``."""

    name = "apollo"
    update_rule = "apollo"
    settings_class = ApolloFiraSettings
    scale_type: ClassVar[str] = "channel"
    default_apollo_scale: ClassVar[float] = 1.0
    config_keys = ("rank", "target_modules", "update_proj_gap", "apollo_scale", "norm_growth_limit")

    def projection_rank(self) -> int:
        return self.cfg.rank

    def projected_settings(self) -> dict[str, Any]:
        c = self.cfg
        apollo_scale = self.default_apollo_scale if c.apollo_scale is None else c.apollo_scale
        return dict(
            rank=self.projection_rank(),
            scale=math.sqrt(apollo_scale),  # apollo-torch's `scale` is the square of the multiplier
            proj_type="std",
            update_proj_gap=c.update_proj_gap,
            projector="random",
            update_rule=self.update_rule,
            scale_type=self.scale_type,
            norm_growth_limit=c.norm_growth_limit,
            seed=self.seed,
        )


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1, one scaling factor per tensor, ``method.apollo_scale`` 128 by default (the paper's
    sqrt(128) multiplier)."""

    name = "apollo_mini"
    scale_type = "tensor"
    default_apollo_scale = 128.0
    config_keys = ("target_modules", "update_proj_gap", "apollo_scale", "norm_growth_limit")
    resume_keys = ("target_modules",)

    def projection_rank(self) -> int:
        return 1


GALORE_METHODS = (GaLore, GaLoreEF, GaLoreDynamic, GaLoreDynamicEF, GaLore8bit, GaLoreAdafactorMethod)
APOLLO_FIRA_METHODS = (Apollo, ApolloMini, Fira)

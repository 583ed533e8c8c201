"""SO8T adapters: SO(8) rotations in front of the attention output projection.

For each selected decoder layer the input ``x`` of ``self_attn.o_proj`` becomes ``M x`` with

    M = I + λ · Pᵀ (R(α) − I) P

``P`` (8k × hidden, no bias) projects into k blocks of 8; ``R(α)`` is block-diagonal with
blocks ``exp(α·A_i)``, ``A_i`` skew-symmetric from 28 free parameters, so every block lies
exactly in SO(8); ``λ`` starts at 0, so at initialisation the model is the base model.
``M`` is linear and sits before ``o_proj``: :func:`fold_into_o_proj` merges it into
``o_proj.weight`` exactly. This is the only module that knows about SO(8).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from so8t_exp.config import AlphaGateConfig, PETConfig, SO8TConfig

BLOCK = 8
_TRIU = torch.triu_indices(BLOCK, BLOCK, offset=1)  # the 28 free entries of a skew matrix


class SO8TAdapter(nn.Module):
    """``x ↦ x + λ·Pᵀ(R(α) − I)P x`` on the last dimension of ``x``."""

    def __init__(self, hidden: int, blocks: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.blocks = blocks
        self.proj = nn.Parameter(torch.randn(BLOCK * blocks, hidden) * init_std)
        self.skew_params = nn.Parameter(torch.randn(blocks, BLOCK * (BLOCK - 1) // 2) * 0.1)
        self.scale = nn.Parameter(torch.zeros(()))  # λ
        self.register_buffer("alpha", torch.zeros(()), persistent=False)
        self.last_delta: torch.Tensor | None = None  # for the PET regulariser
        self.last_rotation: torch.Tensor | None = None  # for rotation_health, no grad

    def skew(self) -> torch.Tensor:
        a = self.skew_params.new_zeros(self.blocks, BLOCK, BLOCK)
        a[:, _TRIU[0], _TRIU[1]] = self.skew_params
        return a - a.transpose(1, 2)

    def rotation(self) -> torch.Tensor:
        """The k blocks of R(α), shape (k, 8, 8), computed in float32."""
        return torch.linalg.matrix_exp(self.alpha.float() * self.skew().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj.to(x.dtype)
        z = (x @ p.T).unflatten(-1, (self.blocks, BLOCK))  # (..., k, 8)
        eye = torch.eye(BLOCK, device=x.device)
        # R − I in float32, cast once: in bf16, R itself rounds its ≈1 diagonal to steps of
        # 2⁻⁸, an error larger than the whole rotation early in the alpha gate.
        rotation = self.rotation()
        rot_minus_i = (rotation - eye).to(x.dtype)
        # What is actually applied, in its dtype (read by rotation_health); in float32 that
        # is R itself (adding I back would round it).
        applied = rotation if x.dtype == rotation.dtype else rot_minus_i.float() + eye
        self.last_rotation = applied.detach()
        moved = torch.einsum("...kj,kij->...ki", z, rot_minus_i).flatten(-2)
        delta = self.scale.to(x.dtype) * (moved @ p)
        self.last_delta = delta if self.training else None
        return x + delta

    def pre_hook(self, _module: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook for ``o_proj``: adapt its input."""
        return (self(args[0]), *args[1:])

    def matrix(self) -> torch.Tensor:
        """M as a dense (hidden × hidden) matrix, acting on column vectors."""
        r = torch.block_diag(*self.rotation())
        p = self.proj.float()
        eye_h = torch.eye(p.shape[1], device=p.device)
        return eye_h + self.scale.float() * p.T @ (r - torch.eye(r.shape[0], device=p.device)) @ p


def select_layers(spec: object, num_layers: int) -> list[int]:
    """``"middle_third"``, ``"all"`` or an explicit list of decoder-layer indices."""
    if spec == "all":
        return list(range(num_layers))
    if spec == "middle_third":
        start = num_layers // 3
        return list(range(start, max(start + 1, num_layers - num_layers // 3)))
    try:
        layers = [int(i) for i in spec]  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"model.so8t.layers={spec!r}: 'middle_third', 'all' or a list of layer indices"
        ) from err
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"model.so8t.layers: {bad} out of range for {num_layers} layers")
    return layers


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return layers
    raise ValueError("model has no decoder layers with self_attn (needed for SO8T adapters)")


def attach_adapters(model: nn.Module, cfg: SO8TConfig) -> list[SO8TAdapter]:
    """Put an adapter in front of ``self_attn.o_proj`` of the selected layers.

    The adapter is a submodule ``self_attn.so8t_adapter`` (so its parameters have stable
    names) called from a forward pre-hook on ``o_proj`` (so it also precedes a LoRA
    wrapper around ``o_proj``). Call after LoRA is applied.
    """
    layers = _decoder_layers(model)
    adapters = []
    for idx in select_layers(cfg.layers, len(layers)):
        attn = layers[idx].self_attn
        if not hasattr(attn, "o_proj"):
            raise ValueError(f"decoder layer {idx}: attention has no o_proj")
        weight = next(attn.o_proj.parameters())
        adapter = SO8TAdapter(attn.o_proj.in_features, cfg.blocks, cfg.init_std)
        adapter.to(device=weight.device)
        attn.so8t_adapter = adapter
        # A bound method, not a closure: deepcopy of the model rebinds it to the copy's
        # adapter.
        attn.o_proj.register_forward_pre_hook(adapter.pre_hook)
        adapters.append(adapter)
    return adapters


def fold_adapters(model: nn.Module) -> int:
    """Fold every adapter into its ``o_proj`` (exactly, in float32, cast once) and remove
    it and its hook: the model becomes a plain model of its architecture. A LoRA around
    ``o_proj`` must be merged first (``merge_and_unload``). Returns how many were folded."""
    folded = 0
    for layer in _decoder_layers(model):
        attn = layer.self_attn
        adapter = getattr(attn, "so8t_adapter", None)
        if adapter is None:
            continue
        if type(attn.o_proj) is not nn.Linear:  # a LoRA wrapper, or quantized weights
            raise ValueError(
                f"o_proj is a {type(attn.o_proj).__name__}: merge the LoRA (and load the "
                "base in float) before folding"
            )
        fold_into_o_proj(attn.o_proj, adapter)
        hooks = attn.o_proj._forward_pre_hooks  # no public API lists a module's hooks
        for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is adapter]:
            del hooks[key]
        del attn.so8t_adapter
        folded += 1
    return folded


def fold_into_o_proj(o_proj: nn.Linear, adapter: SO8TAdapter) -> None:
    """Merge M into ``o_proj.weight`` (W ← W·M), after which the adapter can be removed."""
    with torch.no_grad():
        o_proj.weight.copy_((o_proj.weight.float() @ adapter.matrix()).to(o_proj.weight.dtype))


def alpha_at(step: int, cfg: AlphaGateConfig, max_steps: int) -> float:
    """Alpha gate: a sigmoid annealed from exactly 0 to exactly ``cfg.target``."""
    span = max(1, max_steps // 2 if cfg.anneal_steps is None else cfg.anneal_steps)
    t = min(max((step - cfg.start_step) / span, 0.0), 1.0)
    k = cfg.steepness
    lo, hi = _sigmoid(-k / 2), _sigmoid(k / 2)
    return cfg.target * (_sigmoid(k * (t - 0.5)) - lo) / (hi - lo)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pet_weight_at(step: int, cfg: PETConfig, max_steps: int) -> float:
    """PET weight: linear warmup to ``weight``, flat, then linear anneal to ``final_weight``."""
    frac = step / max(1, max_steps)
    if frac < cfg.warmup_fraction:
        return cfg.weight * frac / cfg.warmup_fraction
    if frac < cfg.anneal_fraction:
        return cfg.weight
    tail = (frac - cfg.anneal_fraction) / max(1e-9, 1.0 - cfg.anneal_fraction)
    return cfg.weight + (cfg.final_weight - cfg.weight) * min(tail, 1.0)


def set_alpha(adapters: list[SO8TAdapter], alpha: float) -> None:
    for adapter in adapters:
        adapter.alpha.fill_(alpha)


def pet_mask(mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq-2): 1 where a second difference spans three real (unpadded) tokens."""
    return mask[..., 2:] * mask[..., 1:-1] * mask[..., :-2]


def pet_sum(adapters: list[SO8TAdapter], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over positions (of :func:`pet_mask`) of the squared second difference along the
    sequence of the adapters' outputs, averaged over adapters: divided by the number of
    positions it is the PET regulariser. Zero when no adapter ran in training mode."""
    terms = []
    for adapter in adapters:
        d = adapter.last_delta
        if d is None or d.shape[-2] < 3:
            continue
        second = d[..., 2:, :] - 2 * d[..., 1:-1, :] + d[..., :-2, :]
        sq = second.float().pow(2).mean(-1)
        terms.append((sq * pet_mask(mask).to(sq.dtype)).sum() if mask is not None else sq.sum())
    if not terms:
        device = mask.device if mask is not None else None
        return torch.zeros((), device=device)
    return torch.stack(terms).mean()


def pet_loss(adapters: list[SO8TAdapter], mask: torch.Tensor | None = None) -> torch.Tensor:
    """The PET regulariser of the last forward: :func:`pet_sum` over its position count."""
    ran = [a.last_delta for a in adapters if a.last_delta is not None]
    ran = [d for d in ran if d.shape[-2] >= 3]
    if not ran:
        return torch.zeros(())
    n = pet_mask(mask).sum().clamp_min(1) if mask is not None else ran[0][..., 2:, 0].numel()
    return pet_sum(adapters, mask) / n


@torch.no_grad()
def rotation_health(adapters: list[SO8TAdapter]) -> dict[str, float]:
    """Worst ‖RᵀR − I‖_F and |det R − 1| over all blocks (both ~1e-6 when healthy in
    float32, ~1e-2 in bf16), of the rotations the last forward pass applied, in the dtype it
    applied them (computed afresh for an adapter not run yet):
    logged every step, so it must not redo each adapter's matrix exponential."""
    if not adapters:
        return {}
    rots = torch.cat(
        [a.rotation() if a.last_rotation is None else a.last_rotation for a in adapters]
    ).double()
    eye = torch.eye(BLOCK, dtype=rots.dtype, device=rots.device)
    ortho = torch.linalg.matrix_norm(rots.transpose(1, 2) @ rots - eye).max()
    det = (torch.linalg.det(rots) - 1).abs().max()
    ortho, det = torch.stack([ortho, det]).tolist()  # one device sync, not two
    return {"so8t/ortho_error": ortho, "so8t/det_error": det}

"""Per-layer analysis of a frozen encoder (method §10.2): what every block's features and attention look like.

* :func:`layer_outputs` runs a timm ViT or Swin once and returns, for every block, the mean-pooled features
  and (ViT only) the per-head attention NMI and mean attention distance of each image. Attention probabilities
  are recomputed from the block's own ``qkv`` projection on the block's attention input (captured by a forward
  pre-hook), so timm's fused attention is never patched and the encoder runs exactly as in fine-tuning.
* :func:`attention_nmi`: Park et al.'s normalised mutual information between queries and keys (method §10.2).
* :func:`attention_distance`: attention-weighted mean query-key distance in pixels (Dosovitskiy et al.).
* :func:`probe_top1` / :func:`per_layer_scores`: linear-probe (multinomial logistic regression) and weighted
  kNN top-1 of every layer's features.
* :func:`reconstruct`: each tap's prediction and target on masked cells (LocalMIM/MAE ViT pre-training models).

Swin: features per block apply; NMI and distance do not (window attention sees only its window, so neither
an image-wide query-key NMI nor a distance bounded by the window size compares with ViT's), and are skipped.
Pure computation: no file I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from localmim.eval.knn import knn_top1

NMI_EPS = 1e-8  # added to every attention probability before the rows are re-normalised (method §10.2)


def _renorm(attn: Tensor) -> Tensor:
    a = attn.double() + NMI_EPS
    return a / a.sum(-1, keepdim=True)


def attention_nmi(attn: Tensor) -> Tensor:
    """NMI of attention maps ``[..., N, N]`` (rows: queries, patch tokens only) -> ``[...]`` float64.

    ``p(q) = 1/N``; ``p(k) = mean_q A[q, k]``; ``I = sum_qk A[q,k]/N log(A[q,k]/p(k))``; ``NMI = I / sqrt(log N *
    H(K))``. Uniform rows give 0, a permutation (every query its own key) gives 1.
    """
    a = _renorm(attn)  # [..., N, N]
    n = a.shape[-1]
    pk = a.mean(-2)  # [..., N] key marginal
    mi = (a * (a.log() - pk.log().unsqueeze(-2))).sum((-2, -1)) / n  # [...]
    hk = -(pk * pk.log()).sum(-1)  # [...]
    return mi / (math.log(n) * hk).clamp_min(1e-300).sqrt()


def grid_distances(grid: tuple[int, int], patch_size: int, device=None) -> Tensor:
    """``[N, N]`` float64 Euclidean distances in pixels between the centres of the patches of a raster grid."""
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).double() * patch_size  # [N, 2]
    return torch.cdist(pos, pos)  # [N, N]


def attention_distance(attn: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Mean attention distance ``[...]`` (pixels) of maps ``[..., N, N]`` over a raster patch grid:
    ``mean_q sum_k A[q, k] * |pos_q - pos_k|`` with rows re-normalised over the patch tokens."""
    a = _renorm(attn)  # [..., N, N]
    d = grid_distances(grid, patch_size, a.device)  # [N, N]
    return (a * d).sum(-1).mean(-1)


def attention_probs(attn_mod: nn.Module, x: Tensor) -> Tensor:
    """Softmax attention ``[B, H, T, T]`` of a timm ``Attention`` on its input ``x [B, T, C]`` (no mask)."""
    b, t, _ = x.shape
    qkv = attn_mod.qkv(x).reshape(b, t, 3, attn_mod.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
    q, k = attn_mod.q_norm(qkv[0]), attn_mod.k_norm(qkv[1])
    return ((q.float() * attn_mod.scale) @ k.float().transpose(-2, -1)).softmax(-1)  # [B, H, T, T]


def is_swin(model: nn.Module) -> bool:
    return hasattr(model, "layers") and not hasattr(model, "blocks")


def encoder_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of a timm ViT (``blocks``) or Swin (``layers[i].blocks``), input to output."""
    if is_swin(model):
        return [blk for stage in model.layers for blk in stage.blocks]
    return list(model.blocks)


@dataclass
class LayerOutputs:
    """Per block ``l``: ``feats[l] [B, d_l]`` (mean over patch tokens); ViT only: ``nmi[l]`` and ``dist[l]``
    ``[B, H]`` (per image and head, float64)."""

    feats: list[Tensor]
    nmi: list[Tensor] = field(default_factory=list)
    dist: list[Tensor] = field(default_factory=list)


@torch.no_grad()
def layer_outputs(model: nn.Module, images: Tensor, *, attention: bool = True) -> LayerOutputs:
    """Run ``model`` (a timm ViT or Swin, eval mode) on normalised ``images [B, 3, S, S]``; see LayerOutputs."""
    swin = is_swin(model)
    blocks = encoder_blocks(model)
    out = LayerOutputs([])
    prefix = 0 if swin else int(getattr(model, "num_prefix_tokens", 1))
    handles = []

    def keep_feats(_m, _args, y: Tensor) -> None:
        y = y.flatten(1, 2) if swin else y[:, prefix:]  # [B, N, d] patch tokens
        out.feats.append(y.float().mean(1))

    def keep_attn(m, args) -> None:
        a = attention_probs(m, args[0])[..., prefix:, prefix:]  # [B, H, N, N] patch tokens only
        out.nmi.append(attention_nmi(a).cpu())
        out.dist.append(attention_distance(a, tuple(model.patch_embed.grid_size), model.patch_embed.patch_size[0])
                        .cpu())

    try:
        for blk in blocks:
            handles.append(blk.register_forward_hook(keep_feats))
            if attention and not swin:
                handles.append(blk.attn.register_forward_pre_hook(keep_attn))
        model(images)
    finally:
        for h in handles:
            h.remove()
    return out


def probe_top1(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int, *,
               steps: int = 100, weight_decay: float = 1e-3) -> float:
    """Linear probe: multinomial logistic regression on standardised features (train statistics), trained full
    batch with L-BFGS for ``steps`` iterations and an L2 penalty; returns val top-1 (percent). Deterministic."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x, vx = (train_x.float() - mu) / sd, (val_x.float() - mu) / sd  # [N, d], [Q, d]
    lin = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")
    y = train_y.to(x.device)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + weight_decay * lin.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = lin(vx).argmax(1).cpu()
    return 100.0 * (pred == val_y.cpu()).double().mean().item()


def per_layer_scores(train: list[Tensor], train_y: Tensor, val: list[Tensor], val_y: Tensor, num_classes: int, *,
                     probe_steps: int = 100, weight_decay: float = 1e-3, k: int = 20,
                     temperature: float = 0.07) -> dict[str, list[float]]:
    """``{"probe_top1": [...], "knn_top1": [...]}``, one value per layer (features ``[N, d_l]`` per layer)."""
    probe = [probe_top1(a, train_y, b, val_y, num_classes, steps=probe_steps, weight_decay=weight_decay)
             for a, b in zip(train, val, strict=True)]
    knn = [knn_top1(a, train_y, b, val_y, num_classes, k=k, temperature=temperature)
           for a, b in zip(train, val, strict=True)]
    return {"probe_top1": probe, "knn_top1": knn}


@dataclass
class TapReconstruction:
    """One tap of a LocalMIM/MAE ViT: prediction and target ``[B, M, F]`` on its cell grid ``(h, w)``, the cell
    side in pixels and the cell mask ``[B, M]`` (weight > 0: the cell overlaps masked patches)."""

    name: str
    cell: int
    grid: tuple[int, int]
    pred: Tensor
    target: Tensor
    mask: Tensor


@torch.no_grad()
def reconstruct(model: nn.Module, images: Tensor, mask_ratio: float, generator: torch.Generator | None = None
                ) -> tuple[Tensor, list[TapReconstruction]]:
    """Masked forward pass of a ``LocalMIMViT`` on uint8 ``images``: the patch mask ``[B, N]`` (1 = masked)
    and every tap's prediction next to its target (the same tensors the pre-training loss compares)."""
    from localmim.models.common import resize_mask

    targets = model.compute_targets(images)
    taps, mask, ids_restore = model.forward_encoder(model._to_input(images), mask_ratio, generator)
    mask_grid = mask.view(mask.shape[0], *model.grid_size)  # [B, gh, gw]
    out = []
    for k, (name, s) in enumerate(zip(model.loss_names, model.scales, strict=True)):
        pred = model.forward_decoder(k, taps[k], ids_restore).float()  # [B, M_k, F_k]
        grid = (int(model.grid_size[0] * s), int(model.grid_size[1] * s))
        w = resize_mask(mask_grid, s).reshape(mask.shape[0], -1)  # [B, M_k]
        out.append(TapReconstruction(name, model.target_cells[k], grid, pred, targets[k].float(), w > 0))
    return mask, out

"""Building blocks shared by the ViT and Swin LocalMIM models (method §2, §3).

Pure torch + timm: position embeddings, per-sample masking, mask resizing, the masked loss, the
scale-specific decoder heads and the masked-token decoder, the reference initialisation, and activation
(gradient) checkpointing for every model the stages build (:func:`set_grad_checkpointing`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models import checkpoint
from timm.models.vision_transformer import Block
from torch import Tensor, nn

import localmim.targets as T

LN_EPS = 1e-6


def vit_block(dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> Block:
    """Pre-norm timm transformer block as used by LocalMIM: qkv bias on, GELU, LayerNorm eps 1e-6."""
    return Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path,
                 norm_layer=partial(nn.LayerNorm, eps=LN_EPS))


def run_block(block, *args, enabled: bool) -> Tensor:
    """``block(*args)``; with ``enabled`` (and autograd recording) under activation checkpointing: the activations
    inside are not kept but recomputed in the backward pass (timm's ``checkpoint``: ``torch.utils.checkpoint``,
    non-reentrant). The RNG state is saved and restored for the recomputation (``preserve_rng_state``), so drop
    path / dropout inside ``block`` draw the same masks twice and the gradients equal the unchecked ones."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args)
    return block(*args)


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> list[str]:
    """Turn activation checkpointing on or off in every part of ``model`` that has it (``grad_checkpointing`` of
    the pretrain / finetune / segment / detect params): the outermost submodules (``model`` itself included) with
    a ``set_grad_checkpointing(enable)`` method get it called (timm's ViT / Swin, the LocalMIM models, and so the
    backbone inside a Segmenter or a torchvision Mask R-CNN). What is computed does not change, only what is kept
    for the backward pass.

    Returns:
        the names of the submodules switched (``""`` = ``model``).

    Raises:
        ValueError: ``enable`` and no submodule supports it (a silent no-op would leave the memory as it was).
    """
    done: list[str] = []
    for name, module in model.named_modules():
        if any(d == "" or name.startswith(d + ".") for d in done):
            continue  # inside a module already switched: its own method covers it
        if callable(getattr(module, "set_grad_checkpointing", None)):
            module.set_grad_checkpointing(enable)
            done.append(name)
    if enable and not done:
        raise ValueError(f"{type(model).__name__} has no part that supports gradient checkpointing")
    return done


def sincos_pos_embed_2d(h: int, w: int, dim: int, cls_token: bool = False) -> Tensor:
    """Fixed 2-D sin-cos position embedding of an ``h x w`` grid (method §2.9).

    The first ``dim/2`` entries encode the column index, the last ``dim/2`` the row index; each half is
    ``[sin(x * omega), cos(x * omega)]`` with ``omega_t = 10000^(-t / (dim/4))``. Tokens are row-major.

    Args:
        h: grid rows.
        w: grid columns.
        dim: embedding width, divisible by 4.
        cls_token: prepend an all-zero vector for a cls slot.

    Returns:
        float32 tensor ``[(1 +) h*w, dim]``.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding width must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")  # [h, w] each
    halves = []
    for coord in (cols.reshape(-1), rows.reshape(-1)):  # column half first, then row half
        angles = coord[:, None] * omega[None, :]  # [h*w, dim/4]
        halves.append(torch.cat([angles.sin(), angles.cos()], dim=1))  # [h*w, dim/2]
    emb = torch.cat(halves, dim=1)  # [h*w, dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)  # [1+h*w, dim]
    return emb.float()


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Number of kept tokens: ``max(1, floor(N * (1 - r)))`` (method §2.1 step 3, guard from §14.1)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_tokens * (1 - mask_ratio)))


def random_masking(batch: int, num_tokens: int, mask_ratio: float, device=None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample MAE-style random masking (method §2.1 step 3).

    Args:
        batch: batch size B.
        num_tokens: tokens per sample N.
        mask_ratio: fraction r of tokens to mask.
        device: device of the returned tensors (and of ``generator`` when given).
        generator: optional RNG for the uniform noise.

    Returns:
        ``ids_keep [B, N_keep]`` (long, indices of visible tokens in noise order),
        ``ids_restore [B, N]`` (long, undoes the sort: ``[kept..., masked...]`` -> raster order),
        ``mask [B, N]`` (float32, 1 = masked, in raster order).
    """
    n_keep = num_visible(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)  # [B, N]
    ids_shuffle = noise.argsort(dim=1)  # [B, N] ascending noise -> kept first
    ids_restore = ids_shuffle.argsort(dim=1)  # [B, N]
    ids_keep = ids_shuffle[:, :n_keep]  # [B, N_keep]
    mask = torch.ones(batch, num_tokens, device=noise.device)  # [B, N]
    mask[:, :n_keep] = 0
    mask = mask.gather(1, ids_restore)  # [B, N] back to raster order
    return ids_keep, ids_restore, mask


def resize_mask(mask_grid: Tensor, scale: float) -> Tensor:
    """Resize a patch-level mask to a target grid and flatten it row-major (method §2.4, §3.7).

    Integer up-factors repeat each value over an ``s x s`` block (stays binary); ``1/k`` averages
    non-overlapping ``k x k`` groups, giving fractional weights (method §13.15: intentional).

    Args:
        mask_grid: ``[B, h, w]`` mask, 1 = masked.
        scale: 1, an integer > 1, or ``1/k`` for an integer k > 1.

    Returns:
        ``[B, M]`` float weights, ``M = (h*s) * (w*s)``.
    """
    m = mask_grid.float()  # [B, h, w]
    if scale >= 1:
        s = int(round(scale))
        if s != scale:
            raise ValueError(f"mask up-scale must be an integer, got {scale}")
        m = m.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)  # [B, h*s, w*s]
    else:
        k = int(round(1 / scale))
        if not math.isclose(k * scale, 1.0):
            raise ValueError(f"mask down-scale must be 1/k for an integer k, got {scale}")
        if m.shape[1] % k or m.shape[2] % k:
            raise ValueError(f"mask grid {tuple(m.shape[1:])} is not divisible by the down-factor {k}")
        m = F.avg_pool2d(m[:, None], kernel_size=k, stride=k)[:, 0]  # [B, h/k, w/k] fractional
    return m.flatten(1)  # [B, M]


def masked_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Weighted masked MSE of method §2.5.

    ``sum_{b,i} w[b,i] * mean_c (pred - target)^2 / sum_{b,i} w[b,i]``: the normaliser is the total weight
    of the whole batch, not per sample. Computed in float32. If the total weight is 0 (mask ratio 0) the
    loss is 0 instead of NaN.

    Args:
        pred: ``[B, M, F]`` prediction.
        target: ``[B, M, F]`` target.
        weight: ``[B, M]`` mask weights (1 = masked, fractional allowed).

    Returns:
        scalar loss tensor.
    """
    if pred.shape != target.shape or pred.shape[:2] != weight.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred.shape)}, target {tuple(target.shape)}, "
                         f"weight {tuple(weight.shape)}")
    per_pos = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, M]
    weight = weight.float()
    return (per_pos * weight).sum() / weight.sum().clamp_min(1e-12)


def build_scale_head(in_dim: int, out_dim: int, scale: float) -> nn.Sequential:
    """Scale-specific ViT decoder head of method §2.2, mapping ``[B, d, g, g]`` to ``[B, out, g*s, g*s]``.

    ``s = 2^k``: k transposed convs (kernel 2, stride 2) halving the channels, with LN2d + GELU between
    consecutive ones (s=4: TConv -> LN2d -> GELU -> TConv; s=2: TConv), then a 1x1 conv.
    ``s = 1``: 1x1 conv. ``s = 1/2^k``: average pool ``2^k`` then 1x1 conv.

    Args:
        in_dim: decoder width d_dec.
        out_dim: target feature size (e.g. 3 * nbins).
        scale: 4, 2, 1, 1/2 (any power of two).
    """
    k = math.log2(scale)
    if not k.is_integer():
        raise ValueError(f"decoder head scale must be a power of two, got {scale}")
    k = int(k)
    if k > 0 and in_dim % (2**k):
        raise ValueError(f"decoder width {in_dim} must be divisible by {2**k} for scale {scale}")
    layers: list[nn.Module] = []
    dim = in_dim
    for i in range(k):
        if i > 0:
            layers += [LayerNorm2d(dim, eps=LN_EPS), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        dim //= 2
    if k < 0:
        layers.append(nn.AvgPool2d(kernel_size=2**-k, stride=2**-k))
    layers.append(nn.Conv2d(dim, out_dim, kernel_size=1))
    return nn.Sequential(*layers)


class MaskedDecoder(nn.Module):
    """Light MAE-style decoder body: embed -> mask tokens -> unshuffle -> fixed pos -> blocks -> LN.

    Shared by the ViT decoders (method §2.2 steps 1-4, with a cls slot) and usable for Swin (§3.5 steps 1-4,
    no cls, with a block->raster ``order``). Heads are not included.

    Args:
        in_dim: width of the encoder tap.
        dim: decoder width.
        depth: number of transformer blocks.
        num_heads: attention heads.
        grid: ``(h, w)`` of the full token grid the decoder predicts on.
        cls_token: whether inputs carry a leading cls token (dropped from the output).
        mlp_ratio: MLP ratio of the blocks.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: Sequence[int],
                 cls_token: bool = True, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by its {num_heads} heads")
        self.grid = (int(grid[0]), int(grid[1]))
        self.has_cls = cls_token
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_pos_embed_2d(*self.grid, dim, cls_token=cls_token)[None]  # [1, (1+)N, dim]
        self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = nn.ModuleList(vit_block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable

    def forward(self, x: Tensor, ids_restore: Tensor, order: Tensor | None = None) -> Tensor:
        """Decode visible tokens to the full grid.

        Args:
            x: ``[B, (1+) N_keep, in_dim]`` visible tokens (cls first when ``cls_token``).
            ids_restore: ``[B, N]`` or ``[N]`` permutation taking ``[visible..., masked...]`` to the
                token order of the grid (raster for ViT, block order for Swin).
            order: optional ``[N]`` index applied after the unshuffle (e.g. block order -> raster order).

        Returns:
            ``[B, N, dim]`` decoded patch tokens in raster order (no cls).
        """
        x = self.embed(x)  # [B, (1+)Nk, dim]
        cls, x = (x[:, :1], x[:, 1:]) if self.has_cls else (None, x)
        b, n_keep, dim = x.shape
        n = self.grid[0] * self.grid[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - n_keep, dim)], dim=1)  # [B, N, dim]
        idx = ids_restore.expand(b, n) if ids_restore.dim() == 1 else ids_restore  # [B, N]
        x = x.gather(1, idx[..., None].expand(b, n, dim))  # [B, N, dim] grid order
        if order is not None:
            x = x[:, order]  # [B, N, dim] raster order
        if cls is not None:
            x = torch.cat([cls, x], dim=1)  # [B, 1+N, dim]
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = run_block(blk, x, enabled=self.grad_checkpointing)
        x = self.norm(x)
        return x[:, 1:] if cls is not None else x  # [B, N, dim]


def init_weights_localmim(module: nn.Module) -> None:
    """Reference initialisation (method §2.7, §3.9) applied to every submodule.

    Linear: Xavier-uniform weight, zero bias. LayerNorm (incl. LN2d): weight 1, bias 0. Conv and
    transposed conv keep the framework default (method §13.17). Tokens / patch embedding are
    initialised by the owning model.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MultiScaleTargets:
    """Mixin for the LocalMIM models: model inputs and per-tap targets (HOG or pixels) from the raw images.

    Expects ``target``, ``hog_nbins``, ``hog_biases`` (``None`` or ``[K, 2]``), ``target_cells`` and
    ``norm_pix_loss`` on the model.
    """

    def _to_input(self, images: Tensor) -> Tensor:
        return T.normalize(images) if images.dtype == torch.uint8 else images

    @torch.no_grad()
    def compute_targets(self, images: Tensor) -> list[Tensor]:
        """Per-tap targets ``[B, M_k, F_k]`` from uint8 (exact HOG) or normalised float images, in float32."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            if self.target == "hog":
                biases = None if self.hog_biases is None else list(self.hog_biases)
                maps = T.hog_multiscale(images, self.hog_nbins, self.target_cells, biases)
                return [T.to_tokens(m) for m in maps]  # each [B, M_k, 3*nb]
            x = self._to_input(images).float()
            return [T.pixel_targets(x, c, norm_pix=self.norm_pix_loss) for c in self.target_cells]

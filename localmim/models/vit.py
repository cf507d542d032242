"""Columnar (plain ViT) LocalMIM model and its single-tap MAE baseline (method §2, §14.1, §10.1).

The encoder sees only the visible patches. Four intermediate blocks are tapped; each tap has its own
LayerNorm, its own light decoder and its own reconstruction loss against a target at scale ``s_k``
(finest grid for the lowest tap). Targets (HOG or per-patch-normalised pixels) come from
``localmim.targets`` with cell side ``c_k = p / s_k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn

from localmim import targets as T
from localmim.models.common import (
    LN_EPS,
    MaskedDecoder,
    MultiScaleTargets,
    build_scale_head,
    init_weights_localmim,
    masked_mse,
    random_masking,
    resize_mask,
    run_block,
    sincos_pos_embed_2d,
    vit_block,
)
from localmim.models.registry import register_variant

LOCALMIM_SCALES = (4, 2, 1, 0.5)


def default_taps(depth: int) -> list[int]:
    """0-based tapped blocks: ``[1, 3, D-3, D-1]`` for D >= 7 (method §2.1 step 6).

    For 4 <= D < 7 the reference indices repeat (method §13.5); we use distinct increasing taps that
    keep "two low, two high" (method §14.1 [X]): ``[0, 1, D-2, D-1]``, e.g. D=4 -> 0,1,2,3 and D=6 -> 0,1,4,5.
    """
    if depth < 4:
        raise ValueError(f"LocalMIM needs 4 distinct taps, so encoder depth must be >= 4, got {depth}")
    return [1, 3, depth - 3, depth - 1] if depth >= 7 else [0, 1, depth - 2, depth - 1]


class LocalMIMViT(MultiScaleTargets, nn.Module):
    """LocalMIM pre-training model with a plain ViT encoder (``mode='localmim'``) or the MAE baseline (``'mae'``).

    Args:
        img_size: input side S (int) or ``(H, W)``.
        patch_size: ViT patch side p.
        embed_dim: encoder width d.
        depth: encoder depth D.
        num_heads: encoder attention heads.
        mlp_ratio: MLP ratio of all blocks.
        decoder_dim: decoder width d_dec (divisible by 4 and by ``decoder_heads``).
        decoder_depth: blocks per decoder.
        decoder_heads: attention heads per decoder.
        target: ``'hog'`` or ``'pixel'`` (per-patch pixels, method §5 [X] for ViT).
        hog_nbins: HOG orientation bins nb.
        hog_bias: draw one frozen random Sobel bias per tap (method §4 step 1); kept in the state dict.
        norm_pix_loss: per-patch normalisation of pixel targets.
        mode: ``'localmim'`` (4 taps, scales 4/2/1/½) or ``'mae'`` (top layer only, scale 1).
        grad_isolate: stop the gradient after each tap (method §10.1, our interpretation [X]).
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, decoder_dim: int = 256,
                 decoder_depth: int = 1, decoder_heads: int = 8, target: str = "hog", hog_nbins: int = 9,
                 hog_bias: bool = False, norm_pix_loss: bool = True, mode: str = "localmim",
                 grad_isolate: bool = False):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        self.img_size = h if h == w else (h, w)
        self.patch_size = patch_size
        self.grid_size = (h // patch_size, w // patch_size) if patch_size > 0 else (0, 0)
        self.target, self.hog_nbins, self.norm_pix_loss = target, hog_nbins, norm_pix_loss
        self.mode, self.grad_isolate = mode, grad_isolate
        if depth < 1:
            raise ValueError(f"encoder depth must be >= 1, got {depth}")
        self.taps = default_taps(depth) if mode == "localmim" else [depth - 1]
        self.scales = list(LOCALMIM_SCALES) if mode == "localmim" else [1]
        self.loss_names = [f"tap{k + 1}" for k in range(4)] if mode == "localmim" else ["top"]
        self._validate(h, w, embed_dim, depth, num_heads, decoder_dim, decoder_heads)
        self.target_cells = [int(patch_size / s) for s in self.scales]
        self.target_dims = [3 * hog_nbins if target == "hog" else 3 * c * c for c in self.target_cells]

        self.patch_embed = PatchEmbed((h, w), patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos with a zero cls slot; a persistent buffer so the export can copy it (method §8.2).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(*self.grid_size, embed_dim, cls_token=True)[None])
        self.blocks = nn.ModuleList(vit_block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.tap_norms = nn.ModuleList(nn.LayerNorm(embed_dim, eps=LN_EPS) for _ in self.taps)
        self.decoders = nn.ModuleList(
            MaskedDecoder(embed_dim, decoder_dim, decoder_depth, decoder_heads, self.grid_size, cls_token=True,
                          mlp_ratio=mlp_ratio) for _ in self.taps)
        self.heads = nn.ModuleList(
            build_scale_head(decoder_dim, f, s) for f, s in zip(self.target_dims, self.scales, strict=True))
        if target == "hog" and hog_bias:
            # One independent frozen bias (beta0, beta1) per tap scale, drawn at construction (method §13.13).
            self.register_buffer("hog_biases", torch.stack([T.make_hog_bias() for _ in self.taps]))  # [K, 2]
        else:
            self.hog_biases = None
        self.grad_checkpointing = False
        self._init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every encoder and decoder block in the backward pass instead of keeping its activations
        (timm's protocol; :func:`localmim.models.common.set_grad_checkpointing`). The masking noise is drawn
        outside the blocks, so it is drawn once either way."""
        self.grad_checkpointing = enable
        for dec in self.decoders:
            dec.set_grad_checkpointing(enable)

    def _validate(self, h: int, w: int, embed_dim: int, depth: int, num_heads: int, decoder_dim: int,
                  decoder_heads: int) -> None:
        p = self.patch_size
        if self.mode not in ("localmim", "mae"):
            raise ValueError(f"mode must be 'localmim' or 'mae', got {self.mode!r}")
        if self.target not in ("hog", "pixel"):
            raise ValueError(f"target must be 'hog' or 'pixel', got {self.target!r}")
        if p <= 0 or h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        gh, gw = self.grid_size
        if min(self.scales) < 1 and (gh % 2 or gw % 2):
            raise ValueError(f"the 1/2-scale tap needs an even patch grid, got {gh}x{gw} (image {h}x{w}, patch {p})")
        for s in self.scales:
            if not (p / s).is_integer():
                raise ValueError(f"target cell p/s = {p}/{s} is not an integer; patch size must be divisible by 4")
        if embed_dim % num_heads or embed_dim % 4:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 and by num_heads {num_heads}")
        max_up = max(self.scales)
        if decoder_dim % decoder_heads or decoder_dim % 4 or decoder_dim % max_up:
            raise ValueError(f"decoder_dim {decoder_dim} must be divisible by 4, by {int(max_up)} (channel "
                             f"halvings) and by decoder_heads {decoder_heads}")
        if self.hog_nbins < 1:
            raise ValueError(f"hog_nbins must be >= 1, got {self.hog_nbins}")

    def _init_weights(self) -> None:
        init_weights_localmim(self)  # Linear xavier / LN 1,0; convs keep the default (method §2.7)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # on the flattened (d, 3*p*p) view
        nn.init.normal_(self.cls_token, std=0.02)
        for dec in self.decoders:
            nn.init.normal_(dec.mask_token, std=0.02)

    # ----------------------------------------------------------------------------------------- encoder

    def _embed(self, x: Tensor) -> Tensor:
        return self.patch_embed(x) + self.pos_embed[:, 1:].to(x.dtype)  # [B, N, d]

    def _run_blocks(self, x: Tensor) -> list[Tensor]:
        """Run the blocks on ``[B, 1+n, d]`` tokens; return the normalised taps ``z_k`` (each ``[B, 1+n, d]``)."""
        taps = []
        for i, blk in enumerate(self.blocks[: self.taps[-1] + 1]):
            x = run_block(blk, x, enabled=self.grad_checkpointing)
            if i in self.taps:
                taps.append(self.tap_norms[len(taps)](x))
                if self.grad_isolate:
                    x = x.detach()  # blocks up to tap k learn only from L_k (method §10.1 [X])
        return taps

    def forward_encoder(self, x: Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        """Encode the visible patches of a normalised image.

        Returns:
            ``taps`` (list of ``[B, 1+N_keep, d]``), ``mask [B, N]`` (1 = masked, raster), ``ids_restore [B, N]``.
        """
        x = self._embed(x)  # [B, N, d]
        b, n, d = x.shape
        ids_keep, ids_restore, mask = random_masking(b, n, mask_ratio, x.device, generator)
        x = x.gather(1, ids_keep[..., None].expand(b, -1, d))  # [B, N_keep, d]
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(b, -1, -1)  # [B, 1, d]
        return self._run_blocks(torch.cat([cls, x], dim=1)), mask, ids_restore

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """Unmasked encoder pass: the normalised taps, each ``[B, 1+N, d]`` in raster order (cls first)."""
        x = self._embed(self._to_input(images))  # [B, N, d]
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)  # [B, 1, d]
        return self._run_blocks(torch.cat([cls, x], dim=1))

    # ----------------------------------------------------------------------------------------- decoders

    def forward_decoder(self, k: int, z: Tensor, ids_restore: Tensor) -> Tensor:
        """Decoder + scale head of tap ``k``: ``[B, 1+N_keep, d]`` -> ``[B, M_k, F_k]`` (row-major cells)."""
        y = self.decoders[k](z, ids_restore)  # [B, N, d_dec] raster order, cls dropped
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], *self.grid_size)  # [B, d_dec, gh, gw]
        y = self.heads[k](y)  # [B, F_k, gh*s_k, gw*s_k]
        return y.flatten(2).transpose(1, 2)  # [B, M_k, F_k]

    # ----------------------------------------------------------------------------------------- targets / loss

    def forward(self, images: Tensor, mask_ratio: float = 0.75, targets: Sequence[Tensor] | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Masked pre-training step.

        Args:
            images: uint8 ``[B, 3, H, W]`` (0..255, normalised here) or a normalised float image.
            mask_ratio: fraction of patches to mask.
            targets: optional precomputed per-tap targets ``[B, M_k, F_k]``; computed from ``images`` if None.
            generator: optional RNG for the masking noise.

        Returns:
            ``loss`` (sum over taps), ``{name: detached per-tap loss}``, ``mask [B, N]`` (1 = masked).
        """
        if targets is None:
            targets = self.compute_targets(images)
        if len(targets) != len(self.taps):
            raise ValueError(f"expected {len(self.taps)} target tensors, got {len(targets)}")
        taps, mask, ids_restore = self.forward_encoder(self._to_input(images), mask_ratio, generator)
        mask_grid = mask.view(mask.shape[0], *self.grid_size)  # [B, gh, gw]
        losses = {}
        for k, (name, s) in enumerate(zip(self.loss_names, self.scales, strict=True)):
            pred = self.forward_decoder(k, taps[k], ids_restore)  # [B, M_k, F_k]
            losses[name] = masked_mse(pred, targets[k], resize_mask(mask_grid, s))
        loss = torch.stack(list(losses.values())).sum()
        return loss, {n: v.detach() for n, v in losses.items()}, mask

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay beyond the ``ndim <= 1`` rule (none: method §2.8 decays tokens)."""
        return set()

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_size)


# --------------------------------------------------------------------------------------------- registry

_ENCODERS = {
    "micro_patch8": dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2),
    "tiny_patch8": dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3),
    "tiny_patch16": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small_patch16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}
# LocalMIM decoders: 256/1/8 for every reference size (method §2.2); d_dec <= d for the small-image models (§14.1).
_LOCALMIM_DECODERS = {
    "micro_patch8": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "tiny_patch8": dict(decoder_dim=128, decoder_depth=1, decoder_heads=4),
}
# ViT-L recipe: HOG nb 18 with bias (method §7); others nb 9 without bias.
_TARGETS = {"large_patch16": dict(hog_nbins=18, hog_bias=True)}
# MAE baselines: standard 512/8/16 decoder for S/B/L; small decoders for the tiny models.
_MAE_DECODERS = {
    "micro_patch8": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "tiny_patch8": dict(decoder_dim=128, decoder_depth=2, decoder_heads=4),
    "tiny_patch16": dict(decoder_dim=256, decoder_depth=4, decoder_heads=8),
}


def _variant(size: str, mode: str) -> dict:
    base = dict(_ENCODERS[size], **_TARGETS.get(size, {}), mode=mode)
    if mode == "localmim":
        base.update(_LOCALMIM_DECODERS.get(size, {}))
    else:
        base.update(_MAE_DECODERS.get(size, dict(decoder_dim=512, decoder_depth=8, decoder_heads=16)))
        base.update(target="pixel", hog_bias=False)  # MAE baseline: normalised pixels at the patch scale
    return base


for _size in _ENCODERS:
    for _mode in ("localmim", "mae"):
        register_variant(f"{_mode}_vit_{_size}", LocalMIMViT, _variant(_size, _mode))

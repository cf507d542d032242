"""Pyramidal (Swin) LocalMIM model and its top-only baseline (method §3, §14.2).

The encoder computes only the visible tokens of a block-wise mask shared by the batch (mask unit = one cell of
the final G x G grid). Taps "stage k + patch merging" (k = 1..3) and the stage-4 output each get their own
LayerNorm and a light decoder that predicts, over the whole tap grid, a target whose cell equals the tap stride:
HOG (method §4) or per-patch-normalised pixels (method §5) with cell sides (2p0, 4p0, 8p0, 8p0). The multi-scale
structure comes from the hierarchy, so the decoders have no up/down-sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from localmim import targets as T
from localmim.models.common import (
    LN_EPS,
    MaskedDecoder,
    MultiScaleTargets,
    init_weights_localmim,
    masked_mse,
    resize_mask,
)
from localmim.models.registry import register_variant
from localmim.models.swin_encoder import SwinVisibleEncoder
from localmim.models.swin_geometry import draw_cell_mask, to_device

MASK_SCALES = (4, 2, 1, 1)  # cell mask (G x G) -> tap grids (4G, 2G, G, G)
CELL_FACTORS = (2, 4, 8, 8)  # target cell side / p0 = tap stride / p0


class LocalMIMSwin(MultiScaleTargets, nn.Module):
    """LocalMIM pre-training with a Swin encoder (``mode='localmim'``) or a top-only baseline (``'mae'``).

    Args:
        img_size: Square input side S (``S % 8p0 == 0``, ``G = S/8p0 >= 2``).
        patch_size: Stem patch side p0.
        embed_dim: Stage-1 width C.
        depths: Blocks per stage (4 stages).
        num_heads: Heads per stage.
        window_size: Window side w; must divide every stage resolution larger than it.
        mlp_ratio: MLP ratio of encoder and decoder blocks.
        decoder_dim: Base decoder width d_dec; tap decoders use (d_dec/2, d_dec, d_dec, d_dec).
        decoder_depth: Blocks per decoder.
        decoder_heads: Heads per decoder.
        target: ``'hog'`` or ``'pixel'``.
        hog_nbins: HOG orientation bins nb.
        hog_bias: One frozen random Sobel bias per tap (method §4 step 1), kept in the state dict.
        norm_pix_loss: Per-patch normalisation of pixel targets.
        mode: ``'localmim'`` (4 taps) or ``'mae'`` (one decoder on the stage-4 tap, SimMIM/GreenMIM-style).
        reference_mask_count: Mask ``floor(r*N_m)+1`` cells as the reference does, instead of
            ``N_m - max(1, floor(N_m(1-r)))`` (method §14.2).
        drop_path_rate: Encoder stochastic depth (0 in pre-training).
        attn_impl: Visible-token attention: ``'auto'``, ``'packed'`` or ``'dense'`` (see ``SwinVisibleEncoder``).
        dense_max_tokens: With ``'auto'``, blocks with at most this many visible tokens use one dense attention
            (None: ``2 * w_i**2``, the reference's rule).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, embed_dim: int = 128, depths=(2, 2, 18, 2),
                 num_heads=(4, 8, 16, 32), window_size: int = 7, mlp_ratio: float = 4.0, decoder_dim: int = 128,
                 decoder_depth: int = 1, decoder_heads: int = 4, target: str = "hog", hog_nbins: int = 18,
                 hog_bias: bool = True, norm_pix_loss: bool = True, mode: str = "localmim",
                 reference_mask_count: bool = False, drop_path_rate: float = 0.0, attn_impl: str = "auto",
                 dense_max_tokens: int | None = None):
        super().__init__()
        self._validate(mode, target, hog_nbins, decoder_dim, decoder_heads)
        self.encoder = SwinVisibleEncoder(img_size, patch_size, embed_dim, depths, num_heads, window_size,
                                          mlp_ratio, drop_path_rate, LN_EPS, attn_impl, dense_max_tokens)
        self.img_size, self.patch_size, self.grid = img_size, patch_size, self.encoder.grid
        self.mode, self.target, self.hog_nbins, self.norm_pix_loss = mode, target, hog_nbins, norm_pix_loss
        self.reference_mask_count = reference_mask_count
        self.taps = [0, 1, 2, 3] if mode == "localmim" else [3]
        self.loss_names = [f"tap{k + 1}" for k in self.taps] if mode == "localmim" else ["top"]
        self.scales = [MASK_SCALES[k] for k in self.taps]
        self.target_cells = [CELL_FACTORS[k] * patch_size for k in self.taps]
        self.target_dims = [3 * hog_nbins if target == "hog" else 3 * c * c for c in self.target_cells]
        self.tap_grids = [self.encoder.tap_grids[k] for k in self.taps]
        widths = [decoder_dim // 2 if k == 0 else decoder_dim for k in self.taps]  # (d/2, d, d, d)

        self.tap_norms = nn.ModuleList(nn.LayerNorm(self.encoder.tap_dims[k], eps=LN_EPS) for k in self.taps)
        self.decoders = nn.ModuleList(
            MaskedDecoder(self.encoder.tap_dims[k], w, decoder_depth, decoder_heads, (g, g), cls_token=False,
                          mlp_ratio=mlp_ratio) for k, w, g in zip(self.taps, widths, self.tap_grids, strict=True))
        self.heads = nn.ModuleList(nn.Linear(w, f) for w, f in zip(widths, self.target_dims, strict=True))
        if target == "hog" and hog_bias:
            # one independent frozen (beta0, beta1) per tap, drawn at construction (method §4 step 1, §13.13)
            self.register_buffer("hog_biases", torch.stack([T.make_hog_bias() for _ in self.taps]))  # [K, 2]
        else:
            self.hog_biases = None
        self._init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every encoder and decoder block in the backward pass instead of keeping its activations
        (timm's protocol; :func:`localmim.models.common.set_grad_checkpointing`). The cell mask is drawn outside
        the blocks, so it is drawn once either way."""
        self.encoder.set_grad_checkpointing(enable)
        for dec in self.decoders:
            dec.set_grad_checkpointing(enable)

    @staticmethod
    def _validate(mode: str, target: str, hog_nbins: int, decoder_dim: int, decoder_heads: int) -> None:
        if mode not in ("localmim", "mae"):
            raise ValueError(f"mode must be 'localmim' or 'mae', got {mode!r}")
        if target not in ("hog", "pixel"):
            raise ValueError(f"target must be 'hog' or 'pixel', got {target!r}")
        if hog_nbins < 1:
            raise ValueError(f"hog_nbins must be >= 1, got {hog_nbins}")
        if decoder_dim % 8 or (decoder_dim // 2) % decoder_heads:
            raise ValueError(f"decoder_dim {decoder_dim} must be divisible by 8 (sin-cos of d/2) and d/2 = "
                             f"{decoder_dim // 2} by decoder_heads {decoder_heads}")

    def _init_weights(self) -> None:
        init_weights_localmim(self)  # Linear xavier / zero bias, LN 1/0; rel-pos tables keep timm's trunc_normal .02
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # flattened (C, 3*p0*p0) view (method §3.9)
        for dec in self.decoders:
            nn.init.normal_(dec.mask_token, std=0.02)

    # ----------------------------------------------------------------------------------------- masking

    def draw_mask(self, mask_ratio: float, generator: torch.Generator | None = None) -> Tensor:
        """One block-wise cell mask for the whole batch: bool ``[G*G]`` on the CPU, True = masked (method §3.2)."""
        return draw_cell_mask(self.grid**2, mask_ratio, self.reference_mask_count, generator)

    def _fill_index(self, cell_mask: Tensor, side: int) -> Tensor:
        """Raster position on the tap grid -> row of ``[visible tokens (block order)..., masked tokens...]``.

        This is the restore permutation (visible first, masked after, each in increasing block order) composed
        with the block -> raster reordering of method §3.5 step 2, using G (not 7).
        """
        g, area = self.grid, side * side
        block_pos = torch.cat([(~cell_mask).nonzero()[:, 0], cell_mask.nonzero()[:, 0]]).argsort()  # [G*G] cell->slot
        y, x = torch.meshgrid(torch.arange(g * side), torch.arange(g * side), indexing="ij")  # tap-grid coords
        cell = (y // side) * g + x // side
        return (block_pos[cell] * area + (y % side) * side + x % side).reshape(-1)  # [(G*side)^2]

    # ----------------------------------------------------------------------------------------- targets / loss

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.img_size, self.img_size):
            raise ValueError(f"expected images [B, 3, {self.img_size}, {self.img_size}], got {tuple(images.shape)}")

    def forward(self, images: Tensor, mask_ratio: float = 0.75, targets: Sequence[Tensor] | None = None,
                generator: torch.Generator | None = None,
                cell_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Masked pre-training step.

        Args:
            images: uint8 ``[B, 3, S, S]`` (normalised here) or a normalised float image.
            mask_ratio: Mask ratio r.
            targets: Optional precomputed per-tap targets ``[B, M_k, F_k]``; computed from ``images`` if None.
            generator: Optional CPU RNG for the mask permutation.
            cell_mask: Optional fixed bool ``[G*G]`` cell mask (True = masked) instead of drawing one.

        Returns:
            ``loss`` (sum over taps), ``{name: detached per-tap loss}``, cell mask ``[B, G*G]`` float (1 = masked).
        """
        self._check_images(images)
        cell_mask = self.draw_mask(mask_ratio, generator) if cell_mask is None else self._check_mask(cell_mask)
        if targets is None:
            targets = self.compute_targets(images)
        if len(targets) != len(self.taps):
            raise ValueError(f"expected {len(self.taps)} target tensors, got {len(targets)}")
        taps = self.encoder(self._to_input(images), (~cell_mask).nonzero()[:, 0])  # block order
        B, g = images.shape[0], self.grid
        mask = to_device(cell_mask.float(), images.device).expand(B, -1)  # [B, G*G]
        losses = {}
        for i, (k, name) in enumerate(zip(self.taps, self.loss_names, strict=True)):
            z = self.tap_norms[i](taps[k])  # [B, L_k, C_k]
            fill = to_device(self._fill_index(cell_mask, self.tap_grids[i] // g), images.device)
            pred = self.heads[i](self.decoders[i](z, fill))  # [B, M_k, F_k] raster order
            losses[name] = masked_mse(pred, targets[i], resize_mask(mask.view(B, g, g), self.scales[i]))
        loss = torch.stack(list(losses.values())).sum()
        return loss, {n: v.detach() for n, v in losses.items()}, mask

    def _check_mask(self, cell_mask: Tensor) -> Tensor:
        cell_mask = cell_mask.detach().to("cpu", torch.bool).reshape(-1)
        if cell_mask.numel() != self.grid**2:
            raise ValueError(f"cell_mask needs {self.grid**2} cells (G={self.grid}), got {cell_mask.numel()}")
        if bool(cell_mask.all()):
            raise ValueError("cell_mask masks every cell; at least one must stay visible")
        return cell_mask

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """Unmasked encoder pass: the normalised taps as raster-order tokens ``[B, R_k^2, C_k]``."""
        self._check_images(images)
        taps = self.encoder.forward_grid(self.encoder.patch_embed(self._to_input(images)))  # NHWC grids
        return [norm(taps[k].flatten(1, 2)) for norm, k in zip(self.tap_norms, self.taps, strict=True)]

    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay besides ndim <= 1: rel-pos tables and tokens (method §3.9)."""
        return {n for n, _ in self.named_parameters() if "position_bias" in n or "token" in n}


# --------------------------------------------------------------------------------------------- export


def export_swin_encoder(model: LocalMIMSwin, include_final_norm: bool = False) -> tuple[str, dict, dict[str, Tensor]]:
    """Encoder weights as a ``timm`` SwinTransformer state dict (method §8.2).

    The encoder already uses timm's module names, so the mapping strips ``encoder.``. Tap norms, decoders and HOG
    biases are dropped: method §8.2 fine-tunes with a *fresh* LayerNorm after pooling (:class:`PoolNormHead`), so
    timm's per-token ``norm`` and the head stay missing. ``include_final_norm`` exports the stage-4 tap LayerNorm
    as ``norm`` instead (it sits exactly where timm's per-token norm does): the pre-trained top output, bit for bit.

    Returns:
        ``(timm_name, timm_kwargs, state_dict)``: :func:`swin_label` names the model; ``timm_kwargs`` is
        JSON-serialisable and carries the full architecture (img/patch/window size, widths, depths, heads), so
        ``timm.models.SwinTransformer(**timm_kwargs)`` builds it (``encoder_io.create_timm_model``). It leaves
        timm's LayerNorm eps (1e-5): pre-training uses 1e-6 (method §3.1) and the reference fine-tunes with 1e-5
        too (method §13.10, minor); add ``norm_layer=partial(nn.LayerNorm, eps=1e-6)`` to reproduce the
        pre-trained encoder bit for bit.
    """
    kwargs = {k: v for k, v in model.encoder.timm_kwargs.items() if k != "norm_layer"}
    state = {k.removeprefix("encoder."): v.detach().clone() for k, v in model.state_dict().items()
             if k.startswith("encoder.")}
    if include_final_norm and 3 in model.taps:
        norm = model.tap_norms[model.taps.index(3)]
        state["norm.weight"], state["norm.bias"] = norm.weight.detach().clone(), norm.bias.detach().clone()
    return swin_label(kwargs), kwargs, state


class PoolNormHead(nn.Module):
    """Swin classifier head of method §8.2: mean over all tokens -> fresh LayerNorm -> linear layer.

    timm's SwinTransformer normalises every token (``norm``) and then pools (``head``); :func:`use_pool_norm_head`
    swaps in this head and an identity ``norm``. Follows timm's head protocol: ``forward(x, pre_logits)`` with the
    NHWC stage-4 map, ``fc`` the linear layer (an identity when ``num_classes == 0``).
    """

    def __init__(self, in_features: int, num_classes: int, eps: float = LN_EPS):
        super().__init__()
        self.in_features = self.num_features = in_features
        self.norm = nn.LayerNorm(in_features, eps=eps)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(x.mean(dim=(1, 2)))  # [B, H, W, C] -> [B, C]
        return x if pre_logits else self.fc(x)


def use_pool_norm_head(net: nn.Module) -> nn.Module:
    """Give a timm ``SwinTransformer`` the method §8.2 head (in place): ``norm`` -> Identity, ``head`` ->
    :class:`PoolNormHead` (state-dict keys ``head.norm.*``, ``head.fc.*``; no ``norm.*``)."""
    net.norm = nn.Identity()
    net.head = PoolNormHead(net.num_features, net.num_classes)
    return net


# (C, depths) with a conventional size word (timm's, plus the small-image "nano").
_SWIN_SIZES = {(96, (2, 2, 6, 2)): "tiny", (96, (2, 2, 18, 2)): "small", (128, (2, 2, 18, 2)): "base",
               (192, (2, 2, 18, 2)): "large", (32, (2, 2, 2, 2)): "nano"}


def swin_label(kwargs: dict) -> str:
    """``swin_<size>_patch<p0>_window<w>_<S>``: what the model is, e.g. ``swin_nano_patch2_window4_64``; for the
    reference Swin-B/L at 224 with window 7 it is timm's own name. Unlisted sizes read ``swin_c<C>d<depths>_...``."""
    depths = tuple(kwargs["depths"])
    size = _SWIN_SIZES.get((kwargs["embed_dim"], depths), f"c{kwargs['embed_dim']}d{''.join(map(str, depths))}")
    return f"swin_{size}_patch{kwargs['patch_size']}_window{kwargs['window_size']}_{kwargs['img_size']}"


# --------------------------------------------------------------------------------------------- registry

_ARCHS = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7),
    "base_w14": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=14),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=14),  # method §6.2
    # small-image variants (method §14.2): 64 px, p0 = 2 -> stages 32/16/8/4, G = 4 (16 cells), w = 4
    "tiny_p2_64": dict(img_size=64, patch_size=2, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                       window_size=4),
    "nano_p2_64": dict(img_size=64, patch_size=2, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                       window_size=4, decoder_dim=32),
}
# Swin recipes (method §7): HOG nb 18 with bias, d_dec 128. The small-image variants have no reference recipe [X]:
# nb 9 without bias, so HOG is computed exactly from the uint8 pixels (method §13.18).
_SMALL_TARGETS = dict(hog_nbins=9, hog_bias=False)


def _variant(arch: str, mode: str) -> dict:
    base = dict(_ARCHS[arch], mode=mode, **(_SMALL_TARGETS if arch.endswith("_64") else {}))
    if mode == "mae":
        base.update(target="pixel", hog_bias=False)  # SimMIM/GreenMIM-style baseline: normalised 8p0-pixel patches
    return base


for _arch in _ARCHS:
    for _mode in ("localmim", "mae"):
        register_variant(f"{_mode}_swin_{_arch}", LocalMIMSwin, _variant(_arch, _mode))

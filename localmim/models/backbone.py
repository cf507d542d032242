"""The exported encoder as a dense-prediction backbone (segmentation method §9.1, detection method §9.2).

:class:`EncoderFeatures` wraps the timm model built from ``encoder.pt`` / ``encoder.json`` and returns NCHW
feature maps, nothing more; the task-specific necks (UperNet's multi-scale neck, ViTDet's simple feature
pyramid, an FPN) are built on top of it by the stages that need them.

- ViT: the outputs of blocks ``indices`` (default: the pre-training taps, e.g. blocks 2, 4, 10, 12 of a
  12-block ViT, 1-based), cls token dropped, reshaped to the patch grid ``[B, D, H/p, W/p]``. timm's
  ``dynamic_img_size`` resamples the position embedding to every input size (bicubic, cls slot kept).
- Swin: the four stage outputs ``[B, C_s, H/(p*2^s), W/(p*2^s)]``, without a norm (the necks add a fresh one).

Layer-wise lr decay for a model holding this backbone: ``param_groups_with_decay(model, backbone.encoder,
prefix="<attr>.encoder.", ...)`` from :mod:`localmim.models.layer_decay`.
"""

from __future__ import annotations

from torch import Tensor, nn

from localmim.models.encoder_io import EncoderSpec, create_encoder


def is_swin(enc: EncoderSpec) -> bool:
    return enc.timm_name.startswith("swin")


def vit_tap_indices(depth: int) -> list[int]:
    """0-based block indices of the pre-training taps of a depth-``depth`` ViT (method §2.1)."""
    from localmim.models.vit import default_taps

    return list(default_taps(depth))


class EncoderFeatures(nn.Module):
    """Multi-scale NCHW features from an exported encoder (see the module docstring).

    Args:
        enc: the exported encoder (:func:`localmim.models.encoder_io.read_encoder`).
        img_size: the training crop size (position embedding / Swin window grid are built for it; other
            input sizes work too, e.g. whole-image inference).
        indices: ViT block indices (0-based) to return; default: the pre-training taps. Ignored for Swin.
        drop_path: stochastic depth rate of the encoder.
        pretrained: load the encoder weights (False: the same architecture randomly initialised, the baseline).
        window_size: ViT only: ViTDet windowed attention (``window_size`` patches per side) in every block but
            ``global_blocks`` (None: ViTDet's choice); 0 keeps every block global.
    """

    def __init__(self, enc: EncoderSpec, img_size: int, indices: list[int] | None = None, drop_path: float = 0.0,
                 pretrained: bool = True, window_size: int = 0, global_blocks: list[int] | None = None):
        super().__init__()
        self.swin = is_swin(enc)
        extra = dict(strict_img_size=False, dynamic_img_size=True) if self.swin else dict(dynamic_img_size=True)
        spec = enc if pretrained else EncoderSpec(enc.timm_name, enc.timm_kwargs, {})
        self.encoder = create_encoder(spec, input_size=img_size, drop_path=drop_path, **extra)
        if self.swin:
            self.indices = list(range(len(self.encoder.layers)))
            self.out_channels = [int(f["num_chs"]) for f in self.encoder.feature_info]
            self.strides = [int(f["reduction"]) for f in self.encoder.feature_info]
        else:
            self.indices = indices if indices is not None else vit_tap_indices(len(self.encoder.blocks))
            dim = int(self.encoder.embed_dim)
            self.out_channels = [dim] * len(self.indices)
            self.strides = [int(self.encoder.patch_embed.patch_size[0])] * len(self.indices)
            if window_size:
                from localmim.models.window_attention import window_blocks

                window_blocks(self.encoder, window_size, global_blocks)
        self.windowed = bool(window_size) and not self.swin

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images [B, 3, H, W]`` -> one ``[B, C_i, H/s_i, W/s_i]`` map per index."""
        if self.swin:
            return self.encoder.forward_intermediates(images, norm=False, intermediates_only=True)
        if self.windowed:
            from localmim.models.window_attention import set_grid

            p = self.strides[0]
            set_grid(self.encoder, (images.shape[-2] // p, images.shape[-1] // p))
        return self.encoder.forward_intermediates(images, indices=self.indices, norm=False, output_fmt="NCHW",
                                                  intermediates_only=True)


__all__ = ["EncoderFeatures", "is_swin", "vit_tap_indices"]

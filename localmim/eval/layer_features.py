"""What ``localmim analyze`` measures, read from shards and checkpoints: every block's features (and attention
measures) over a fixed subset of a labelled shard directory. The measures themselves are
:mod:`localmim.eval.analysis`'s; the pre-training model of a checkpoint is loaded by
:func:`localmim.models.encoder_io.load_pretrain_model`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class SplitOutputs:
    """Per-block features ``[N, d]`` of one split, the attention NMI / distance ``[n_attn, heads]`` per block of its
    first images (empty lists for Swin or when none were asked for), and the labels ``[N]``."""

    feats: list[Tensor]
    nmi: list[Tensor]
    dist: list[Tensor]
    labels: Tensor


def split_outputs(net: nn.Module, shard_dir, limit: int, attn_images: int, size: int, *, batch_size: int,
                  num_workers: int, device: torch.device) -> SplitOutputs:
    """Per-block features of the first ``limit`` (0 = all) samples of ``shard_dir``; attention measures of the first
    ``attn_images`` of them (the encoder ``net`` sees uint8 images at ``size`` px, normalised)."""
    from localmim.eval.analysis import layer_outputs
    from localmim.eval.knn import iter_labelled_uint8
    from localmim.targets import normalize

    feats, nmi, dist, labels, seen = [], [], [], [], 0
    for x, y in iter_labelled_uint8(shard_dir, limit, size, batch_size, num_workers):
        n_attn = max(0, min(len(y), attn_images - seen))
        o = layer_outputs(net, normalize(x.to(device)), attention=n_attn > 0)
        feats.append([f.cpu() for f in o.feats])
        if n_attn:
            nmi.append([v[:n_attn] for v in o.nmi])
            dist.append([v[:n_attn] for v in o.dist])
        labels.append(y)
        seen += len(y)
    if not feats:
        raise ValueError(f"{shard_dir}: no samples")
    per_block = lambda parts: [torch.cat(xs) for xs in zip(*parts, strict=True)]  # per block, images joined
    return SplitOutputs(per_block(feats), per_block(nmi), per_block(dist), torch.cat(labels))


def first_images(shard_dir, n: int, size: int) -> Tensor:
    """The first ``n`` images of a labelled shard directory, uint8 ``[n, 3, size, size]`` (eval view)."""
    from localmim.eval.knn import iter_labelled_uint8

    return next(iter_labelled_uint8(shard_dir, n, size, n, 0))[0]

"""Multi-scale HOG targets (method §4, §13.18).

Per colour channel: Sobel responses ``c0`` (kernel K0) and ``c1`` (K1 = K0^T) with reflect padding, magnitude
``sqrt(c0^2 + c1^2)``, hard unsigned orientation bin ``floor(atan2(c0, c1) * nb / pi) mod nb``, a one-bin histogram per
pixel, mean pooling over ``c x c`` cells, and an L2 normalisation of each cell's ``nb``-vector per channel. Features
are ordered ``[R bins, G bins, B bins]``.

Exactness (method §13.18): every orientation that lies exactly on a bin edge must land in the bin that exact arithmetic
gives. Three choices guarantee it:

* Responses are differences of identically computed ``[1, 2, 1]`` sums, so they are exactly 0 wherever the exact
  response is 0 for repeated pixel values (axis-aligned edges, the reflect-padded border).
* Without a bias, HOG is invariant to per-channel ``x -> a*x + b`` (a > 0), so uint8 images are processed as their
  integer values: responses are integers (``|c| <= 4*255``), exact in float32, and device independent.
* The direction is folded into the upper half plane and the angle is taken in float64 everywhere (no
  data-dependent recheck, so no device-to-host sync); ties on the edges whose tangent is rational (0, pi/4, pi/2,
  3pi/4; by Niven's theorem the only ones) are set exactly. Checked on every integer response pair a uint8 image
  can give.

The pipeline is vectorised over batch, channels and scales: gradients are computed once per call, the histogram
once per distinct bias, and coarser cells are pooled from finer ones (a mean of means is exact).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from localmim.targets.pixel import IMAGENET_STD, check_divides, check_images

L2_EPS = 1e-12
NUM_CHANNELS = 3


def make_hog_bias(generator: torch.Generator | None = None) -> Tensor:
    """Draw a frozen Sobel bias ``(beta0, beta1)`` from U(-1/3, 1/3) (method §4 step 1).

    This is the default init of a 1-in-channel 3x3 conv bias (bound ``1/sqrt(9)``). Models store it as a buffer.

    Args:
        generator: optional RNG.

    Returns:
        float32 tensor ``[2]``.
    """
    return (torch.rand(2, generator=generator) * 2.0 - 1.0) / 3.0


@torch.no_grad()
def sobel_responses(images: Tensor) -> tuple[Tensor, Tensor]:
    """Raw Sobel responses of every colour channel (method §4 step 1, without bias).

    ``c0 = S_v[:, j-1] - S_v[:, j+1]`` and ``c1 = S_h[i-1, :] - S_h[i+1, :]``, where ``S_v`` / ``S_h`` are the
    ``[1, 2, 1]`` sums down the rows / along the columns of the reflect-padded image. This equals the 3x3
    cross-correlation with ``K0 = [[1,0,-1],[2,0,-2],[1,0,-1]]`` and ``K1 = K0^T``; on ``x = col`` it gives
    ``c0 = -8, c1 = 0`` and on ``x = row`` ``c0 = 0, c1 = -8``.

    Args:
        images: uint8 ``[B, 3, H, W]`` (integer values are used as they are) or floating ``[B, 3, H, W]``.

    Returns:
        ``(c0, c1)``, float32 ``[B, 3, H, W]`` each.
    """
    check_images(images)
    xp = F.pad(images.float().contiguous(), (1, 1, 1, 1), mode="reflect")  # [B, 3, H+2, W+2]
    s_v = xp[..., :-2, :] + 2 * xp[..., 1:-1, :] + xp[..., 2:, :]  # [B, 3, H, W+2]
    s_h = xp[..., :, :-2] + 2 * xp[..., :, 1:-1] + xp[..., :, 2:]  # [B, 3, H+2, W]
    c0 = s_v[..., :-2] - s_v[..., 2:]  # [B, 3, H, W], left minus right
    c1 = s_h[..., :-2, :] - s_h[..., 2:, :]  # [B, 3, H, W], top minus bottom
    return c0, c1


def orientation_bins(c0: Tensor, c1: Tensor, nbins: int) -> Tensor:
    """Hard unsigned orientation bin ``floor(atan2(c0, c1) * nb / pi) mod nb`` (method §4 steps 3-4).

    Exact for integer responses (the uint8 path): ties on bin edges get the exact-arithmetic bin, and every other
    integer pair (``|c| <= 1020``: at least 5e-7 bins away from an edge) is binned by a float64 angle. Shape-static
    (no ``nonzero``), so it never syncs the device with the host.

    Args:
        c0: responses to K0, any shape.
        c1: responses to K1, same shape.
        nbins: number of bins nb.

    Returns:
        int64 bins in ``0..nb-1``, same shape.
    """
    # (c0, c1) and (-c0, -c1) share a bin: fold into c0 >= 0 so that theta = atan2(y, x) lies in [0, pi).
    y = c0.abs()  # [B, 3, H, W]
    x = torch.where(c0 > 0, c1, torch.where(c0 < 0, -c1, c1.abs()))  # phi = pi (c0 = 0, c1 < 0) is bin 0 like 0
    # float64 atan2 (inputs are float32, so exactly representable) is within a few 1e-16 of exact: integer responses
    # (|c| <= 1020) lie at least 5e-7 bins from an edge they are not on, so the floor is exact. One dense pass, no
    # data-dependent indexing (a masked float32 recheck would need nonzero(): a device-to-host sync).
    t = torch.atan2(y.double(), x.double()).mul_(nbins / math.pi)  # [B, 3, H, W] float64 in [0, nb]
    bins = t.floor_().long().clamp_(0, nbins - 1)  # theta < pi in exact arithmetic
    # Edges with rational tangent can be hit exactly; float rounding of atan2 must not decide those.
    up = y > 0
    if nbins % 2 == 0:  # pi/2 is an edge
        bins = torch.where(up & (x == 0), nbins // 2, bins)
    if nbins % 4 == 0:  # pi/4 and 3pi/4 are edges
        bins = torch.where(up & (x == y), nbins // 4, bins)
        bins = torch.where(up & (x == -y), 3 * nbins // 4, bins)
    return bins


def _biased(c0: Tensor, c1: Tensor, integer_input: bool, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Add the Sobel bias; for uint8 input first map the responses to those of the normalised image."""
    if bias is None:
        return c0, c1
    if tuple(bias.shape) != (2,):
        raise ValueError(f"HOG bias must have shape [2] = (beta0, beta1), got {tuple(bias.shape)}")
    if integer_input:
        # K * ((x/255 - mean) / std) = (K * x) / (255 std): both kernels sum to zero, so the mean cancels.
        scale = _uint8_scale(c0.device)  # [1, 3, 1, 1]
        c0, c1 = c0 / scale, c1 / scale
    bias = bias.detach().to(device=c0.device, dtype=torch.float32)
    return c0 + bias[0], c1 + bias[1]


@functools.cache
def _uint8_scale(device: torch.device) -> Tensor:
    """``255 * std`` (float64, rounded to float32) as ``[1, 3, 1, 1]`` on ``device``; cached, since building it
    from the host on a GPU is a blocking copy (a sync) on every call."""
    scale = 255.0 * torch.tensor(IMAGENET_STD, dtype=torch.float64)
    return scale.to(torch.float32).view(1, NUM_CHANNELS, 1, 1).to(device)


def _histograms(c0: Tensor, c1: Tensor, nbins: int) -> Tensor:
    """Per-pixel one-bin histograms ``[B, 3*nb, H, W]``: the magnitude in its orientation bin, 0 elsewhere."""
    b, ch, h, w = c0.shape
    bins = orientation_bins(c0, c1, nbins)  # [B, 3, H, W]
    mag = torch.hypot(c0, c1)  # [B, 3, H, W]
    hist = c0.new_zeros(b, ch, nbins, h, w)  # [B, 3, nb, H, W]
    hist.scatter_(2, bins.unsqueeze(2), mag.unsqueeze(2))
    return hist.view(b, ch * nbins, h, w)  # channel-major: [R bins, G bins, B bins]


def _cell_histograms(c0: Tensor, c1: Tensor, nbins: int, cell: int) -> Tensor:
    """Un-normalised cell histograms ``[B, 3*nb, H/c, W/c]``: ``pool_cells(_histograms(...), cell)``.

    On CPU each magnitude is added straight into its (channel, bin, cell) slot, without the ``nb`` times larger
    per-pixel map; the CPU scatter-add sums in a fixed serial order, so it is deterministic. CUDA's scatter-add is
    atomic (run-to-run nondeterministic rounding), so other devices take the dense path.
    """
    if c0.device.type != "cpu" or cell == 1:
        return pool_cells(_histograms(c0, c1, nbins), cell)
    b, ch, h, w = c0.shape
    hc, wc = h // cell, w // cell
    bins = orientation_bins(c0, c1, nbins)  # [B, 3, H, W]
    mag = torch.hypot(c0, c1)  # [B, 3, H, W]
    rows = torch.arange(h).div_(cell, rounding_mode="floor")  # [H]
    cols = torch.arange(w).div_(cell, rounding_mode="floor")  # [W]
    cell_id = rows[:, None] * wc + cols[None, :]  # [H, W]
    plane = torch.arange(b * ch).view(b, ch, 1, 1) * nbins  # [B, 3, 1, 1]
    slot = (plane + bins) * (hc * wc) + cell_id  # [B, 3, H, W] index into [B, 3, nb, hc, wc]
    sums = c0.new_zeros(b * ch * nbins * hc * wc).scatter_add_(0, slot.reshape(-1), mag.reshape(-1))
    return sums.view(b, ch * nbins, hc, wc) / (cell * cell)


def _check_nbins(nbins: int) -> None:
    if isinstance(nbins, bool) or not isinstance(nbins, int) or nbins < 1:
        raise ValueError(f"nbins must be a positive int, got {nbins!r}")


@torch.no_grad()
def pixel_histograms(images: Tensor, nbins: int, bias: Tensor | None = None) -> Tensor:
    """Per-pixel orientation histograms, before cell pooling (method §4 steps 1-5).

    Args:
        images: uint8 ``[B, 3, H, W]`` (0..255) or floating normalised model input.
        nbins: number of orientation bins nb.
        bias: optional ``[2]`` Sobel bias; a uint8 input is then treated as its ImageNet-normalised image.

    Returns:
        float32 ``[B, 3*nb, H, W]``.
    """
    _check_nbins(nbins)
    c0, c1 = sobel_responses(images)  # [B, 3, H, W] each
    c0, c1 = _biased(c0, c1, images.dtype == torch.uint8, bias)
    return _histograms(c0, c1, nbins)


@torch.no_grad()
def cell_histograms(images: Tensor, nbins: int, cell: int, bias: Tensor | None = None) -> Tensor:
    """Un-normalised cell histograms, ``pool_cells(pixel_histograms(images, nbins, bias), cell)`` without the
    per-pixel map on CPU (method §4 steps 1-6): the map to store for ``hog_from_pooled``.

    Args:
        images: uint8 ``[B, 3, H, W]`` (0..255) or floating normalised model input.
        nbins: number of orientation bins nb.
        cell: cell size in pixels; must divide H and W.
        bias: optional ``[2]`` Sobel bias (see ``pixel_histograms``).

    Returns:
        float32 ``[B, 3*nb, H/cell, W/cell]``.
    """
    _check_nbins(nbins)
    check_images(images)
    check_divides(cell, images.shape[2], images.shape[3], "cell")
    c0, c1 = _biased(*sobel_responses(images), images.dtype == torch.uint8, bias)  # [B, 3, H, W] each
    return _cell_histograms(c0, c1, nbins, cell)


@torch.no_grad()
def pool_cells(hist: Tensor, cell: int) -> Tensor:
    """Mean over non-overlapping ``cell x cell`` cells (method §4 step 6), un-normalised, float32."""
    if hist.ndim != 4:
        raise ValueError(f"histograms must be [B, F, H, W], got shape {tuple(hist.shape)}")
    check_divides(cell, hist.shape[2], hist.shape[3], "cell")
    hist = hist.float()
    return F.avg_pool2d(hist, cell) if cell > 1 else hist


@torch.no_grad()
def normalize_cells(pooled: Tensor, nbins: int) -> Tensor:
    """L2-normalise each cell's nb-vector per colour channel: ``v / max(||v||, 1e-12)`` (method §4 step 7).

    Args:
        pooled: ``[B, C*nb, h, w]`` cell histograms (any float dtype).
        nbins: number of orientation bins nb.

    Returns:
        float32 ``[B, C*nb, h, w]``.
    """
    _check_nbins(nbins)
    b, f, h, w = pooled.shape
    if f % nbins:
        raise ValueError(f"feature count {f} is not a multiple of nbins {nbins}")
    v = pooled.float().view(b, f // nbins, nbins, h, w)  # [B, C, nb, h, w]
    return F.normalize(v, p=2.0, dim=2, eps=L2_EPS).view(b, f, h, w)


def _pool_hierarchy(base: Tensor, factors: Sequence[int]) -> dict[int, Tensor]:
    """Pool ``base`` by every factor, each from the largest already pooled factor dividing it."""
    pooled: dict[int, Tensor] = {1: base}
    for k in sorted(set(factors)):
        src = max(f for f in pooled if k % f == 0)
        pooled[k] = F.avg_pool2d(pooled[src], k // src) if k > src else pooled[src]
    return pooled


def _check_cells(cells: Sequence[int], h: int, w: int) -> list[int]:
    cells = list(cells)
    if not cells:
        raise ValueError("cells must name at least one cell size")
    for cell in cells:
        check_divides(cell, h, w, "cell")
    return cells


@torch.no_grad()
def hog_multiscale(images: Tensor, nbins: int, cells: Sequence[int],
                   biases: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """HOG at several cell sizes from one gradient pass (method §2.3, §3.6, §4).

    Without biases the histogram is built once, at the greatest common divisor of the cell sizes, and pooled to
    every cell size (coarser cells from finer ones; a mean of means is exact). With per-scale biases the gradients
    are still shared; magnitude and binning are redone per bias.

    Args:
        images: uint8 ``[B, 3, H, W]`` (0..255) or floating normalised model input.
        nbins: number of orientation bins nb.
        cells: cell sizes in pixels, each dividing H and W.
        biases: None, or one entry per cell: None or a ``[2]`` Sobel bias.

    Returns:
        One float32 ``[B, 3*nb, H/c, W/c]`` tensor per cell size, in the order of ``cells``.
    """
    _check_nbins(nbins)
    check_images(images)
    cells = _check_cells(cells, images.shape[2], images.shape[3])
    biases = [None] * len(cells) if biases is None else list(biases)
    if len(biases) != len(cells):
        raise ValueError(f"got {len(biases)} biases for {len(cells)} cell sizes")
    c0, c1 = sobel_responses(images)  # [B, 3, H, W] each
    integer_input = images.dtype == torch.uint8
    plain = [c for c, bias in zip(cells, biases, strict=True) if bias is None]
    shared = {}
    if plain:  # one histogram at the common cell size, coarser cells pooled from it
        base = math.gcd(*plain)
        pooled = _pool_hierarchy(_cell_histograms(c0, c1, nbins, base), [c // base for c in plain])
        shared = {c: pooled[c // base] for c in plain}
    out = []
    for cell, bias in zip(cells, biases, strict=True):
        if bias is None:
            hist = shared[cell]  # [B, 3*nb, H/c, W/c]
        else:
            hist = _cell_histograms(*_biased(c0, c1, integer_input, bias), nbins, cell)  # [B, 3*nb, H/c, W/c]
        out.append(normalize_cells(hist, nbins))
    return out


@torch.no_grad()
def hog(images: Tensor, nbins: int = 9, cell: int = 16, bias: Tensor | None = None) -> Tensor:
    """HOG feature map at one cell size (method §4).

    Args:
        images: uint8 ``[B, 3, H, W]`` (0..255; exact integer computation when ``bias`` is None, otherwise treated as
            its ImageNet-normalised image) or floating normalised model input.
        nbins: number of orientation bins nb.
        cell: cell size in pixels; must divide H and W.
        bias: optional ``[2]`` tensor ``(beta0, beta1)`` added to ``(c0, c1)``.

    Returns:
        float32 ``[B, 3*nb, H/cell, W/cell]``, features ``[R bins, G bins, B bins]``.
    """
    return hog_multiscale(images, nbins, [cell], [bias])[0]


@torch.no_grad()
def hog_from_pooled(pooled_finest: Tensor, nbins: int, finest_cell: int, cells: Sequence[int]) -> list[Tensor]:
    """Normalised HOG at several cell sizes from a stored un-normalised finest-cell map.

    A mean over a ``k c x k c`` cell is the mean of the ``k x k`` means over its ``c x c`` sub-cells, so coarser
    scales follow exactly from the finest pooled map (up to float rounding and the storage dtype).

    Args:
        pooled_finest: ``[B, 3*nb, H/finest_cell, W/finest_cell]`` from ``pool_cells`` (fp32 or fp16).
        nbins: number of orientation bins nb.
        finest_cell: the cell size of ``pooled_finest`` in pixels.
        cells: target cell sizes, each a multiple of ``finest_cell``.

    Returns:
        One float32 ``[B, 3*nb, H/c, W/c]`` tensor per cell size, in the order of ``cells``.
    """
    _check_nbins(nbins)
    if pooled_finest.ndim != 4:
        raise ValueError(f"pooled map must be [B, 3*nb, h, w], got shape {tuple(pooled_finest.shape)}")
    if pooled_finest.shape[1] != NUM_CHANNELS * nbins:
        raise ValueError(f"pooled map has {pooled_finest.shape[1]} features, expected 3*nbins = {3 * nbins}")
    if isinstance(finest_cell, bool) or not isinstance(finest_cell, int) or finest_cell < 1:
        raise ValueError(f"finest_cell must be a positive int, got {finest_cell!r}")
    cells = list(cells)
    bad = [c for c in cells if not isinstance(c, int) or c < finest_cell or c % finest_cell]
    if bad or not cells:
        raise ValueError(f"cells {cells} must be non-empty multiples of the finest cell {finest_cell}")
    factors = [c // finest_cell for c in cells]
    h, w = pooled_finest.shape[2:]
    for c, k in zip(cells, factors, strict=True):
        if h % k or w % k:
            raise ValueError(f"cell {c} = {k} x finest cell {finest_cell} does not tile the {h}x{w} pooled map")
    pooled = _pool_hierarchy(pooled_finest.float(), factors)
    return [normalize_cells(pooled[k], nbins) for k in factors]


def to_tokens(feature_map: Tensor) -> Tensor:
    """Flatten cells row-major into tokens: ``[B, F, h, w] -> [B, h*w, F]``."""
    if feature_map.ndim != 4:
        raise ValueError(f"feature map must be [B, F, h, w], got shape {tuple(feature_map.shape)}")
    return feature_map.flatten(2).transpose(1, 2).contiguous()

"""HOG and pixel targets against the independent float64 NumPy reference in ``tests/hog_reference.py``."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from localmim.targets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    cell_histograms,
    hog,
    hog_from_pooled,
    hog_multiscale,
    make_hog_bias,
    normalize,
    normalize_cells,
    orientation_bins,
    pixel_histograms,
    pixel_targets,
    pool_cells,
    sobel_responses,
    to_tokens,
)
from tests.hog_reference import (
    bins_reference,
    hog_reference_batch,
    normalize_reference,
    pixel_histogram_reference,
    pixel_targets_reference,
    sobel_reference,
)

TOL = 1e-4


# ----------------------------------------------------------------------------------------------------------- inputs


def dyadic_random(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Normal-like float32 images on a 1/64 grid: every Sobel sum is exact in float32 and float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.round(torch.randn(b, 3, h, w, generator=g) * 64) / 64


def rectangles(b: int, h: int, w: int, seed: int, integer: bool) -> torch.Tensor:
    """Images of random axis-aligned rectangles (exact-zero responses everywhere along their edges)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((b, 3, h, w))
    for n in range(b):
        for ch in range(3):
            img = np.full((h, w), rng.integers(0, 256))
            for _ in range(10):
                r0, c0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
                r1, c1 = rng.integers(r0 + 1, h + 1), rng.integers(c0 + 1, w + 1)
                img[r0:r1, c0:c1] = rng.integers(0, 256)
            out[n, ch] = img
    if integer:
        return torch.from_numpy(out).to(torch.uint8)
    return torch.from_numpy((out - 128) / 64).float()  # dyadic: exact in float32


def photo(name: str, top: int, left: int, h: int, w: int) -> torch.Tensor:
    """uint8 ``[1, 3, h, w]`` crop of a real 8-bit photograph shipped with scikit-learn or matplotlib."""
    if name in ("china.jpg", "flower.jpg"):
        arr = load_sample_image(name)
    else:
        arr = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name).convert("RGB"))
    crop = arr[top:top + h, left:left + w]
    assert crop.shape == (h, w, 3)
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].contiguous()


def ramp_noise_uint8(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """uint8 ramps plus 0/1 noise: every interior response is non-zero and far from any bin edge."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.zeros((b, 3, h, w), dtype=np.int64)
    for n in range(b):
        for ch in range(3):
            a, bb = rng.choice([-1, 1]), rng.choice([-2, 2])
            if rng.random() < 0.5:
                a, bb = 2 * a, bb // 2
            ramp = a * cols + bb * rows
            out[n, ch] = ramp - ramp.min() + rng.integers(0, 2, size=(h, w))
    assert out.max() <= 255
    return torch.from_numpy(out).to(torch.uint8)


def assert_close(actual: torch.Tensor, expected: np.ndarray, tol: float = TOL) -> None:
    assert tuple(actual.shape) == expected.shape
    err = np.abs(actual.double().cpu().numpy() - expected).max()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


# ------------------------------------------------------------------------------------------ raw responses and bins


def test_sobel_sign_conventions_on_ramps():
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    for image, expected in ((cols, (-8.0, 0.0)), (rows, (0.0, -8.0))):
        c0, c1 = sobel_responses(image.expand(1, 3, 16, 16))
        assert torch.all(c0[..., 1:-1, 1:-1] == expected[0])
        assert torch.all(c1[..., 1:-1, 1:-1] == expected[1])


@pytest.mark.parametrize("nbins,expected", [(9, (4, 0, 2, 6)), (18, (9, 0, 4, 13))])
def test_ramp_bins(nbins, expected):
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    ramps = (cols, rows, cols + rows, cols - rows + 15)  # x = col, row, col + row, col - row
    for ramp, want in zip(ramps, expected, strict=True):
        image = ramp.to(torch.uint8).expand(1, 3, 16, 16)
        hist = pixel_histograms(image, nbins).view(1, 3, nbins, 16, 16)[..., 1:-1, 1:-1]
        assert torch.all(hist.argmax(dim=2) == want)
        assert torch.all(hist.sum(dim=2) == hist.amax(dim=2))  # one bin per pixel
        assert torch.all(hist.amax(dim=2) > 0)


def test_sobel_matches_direct_correlation_exactly():
    for images in (dyadic_random(2, 20, 28, 0), rectangles(2, 20, 28, 1, integer=True)):
        c0, c1 = sobel_responses(images)
        for n in range(2):
            for ch in range(3):
                r0, r1 = sobel_reference(images[n, ch].double().numpy())
                np.testing.assert_array_equal(c0[n, ch].double().numpy(), r0)
                np.testing.assert_array_equal(c1[n, ch].double().numpy(), r1)


@pytest.mark.parametrize("nbins", [8, 9, 11, 16, 18, 36])
def test_orientation_bins_exact_on_every_integer_response(nbins):
    # all (c0, c1) a uint8 image can produce; a plain float32 floor(atan2 * nb / pi) misplaces ~1000 of them for
    # nb = 8, 16, 36 (ties on pi/4, 3pi/4) and a few near-misses for nb = 11, 36
    v = torch.arange(-1020, 1021, dtype=torch.float32)
    c0, c1 = torch.meshgrid(v, v, indexing="ij")  # [2041, 2041] each
    ref = bins_reference(c0.double().numpy(), c1.double().numpy(), nbins)
    np.testing.assert_array_equal(orientation_bins(c0, c1, nbins).numpy(), ref)


def test_pixel_histograms_match_reference_on_photo():
    image = photo("china.jpg", 120, 260, 64, 64)
    for nbins in (9, 18):
        hist = pixel_histograms(image, nbins)  # [1, 3*nb, 64, 64]
        ref = np.concatenate([pixel_histogram_reference(image[0, ch].numpy(), nbins) for ch in range(3)])
        np.testing.assert_allclose(hist[0].double().numpy(), ref, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------ HOG vs the reference

SIZES_CELLS = [((32, 32), (1, 2, 4, 8, 16, 32)), ((64, 48), (2, 4, 8, 16)), ((96, 128), (4, 8, 16, 32))]


@pytest.mark.parametrize("nbins", [9, 18])
@pytest.mark.parametrize("size,cells", SIZES_CELLS)
@pytest.mark.parametrize("kind", ["dyadic", "rectangles_float", "rectangles_uint8"])
def test_hog_matches_reference(nbins, size, cells, kind):
    h, w = size
    b = 2
    images = {
        "dyadic": lambda: dyadic_random(b, h, w, seed=h + w),
        "rectangles_float": lambda: rectangles(b, h, w, seed=h * w, integer=False),
        "rectangles_uint8": lambda: rectangles(b, h, w, seed=h * w + 1, integer=True),
    }[kind]()
    outs = hog_multiscale(images, nbins, cells)
    for cell, out in zip(cells, outs, strict=True):
        ref = hog_reference_batch(images.double().numpy(), nbins, cell)
        assert_close(out, ref)
        assert_close(hog(images, nbins, cell), ref)


def test_hog_general_float_input_matches_reference():
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    for nbins in (9, 18):
        for cell, out in zip((4, 16), hog_multiscale(images, nbins, (4, 16)), strict=True):
            assert_close(out, hog_reference_batch(images.double().numpy(), nbins, cell))


PHOTOS = [
    ("china.jpg", 100, 200, 224, 224),
    ("flower.jpg", 150, 250, 224, 224),
    ("china.jpg", 150, 300, 64, 64),
    ("flower.jpg", 60, 400, 64, 96),
    ("grace_hopper.jpg", 100, 150, 128, 128),
]


@pytest.mark.parametrize("nbins", [9, 18])
@pytest.mark.parametrize("name,top,left,h,w", PHOTOS)
def test_hog_uint8_photo_matches_exact_integer_hog(nbins, name, top, left, h, w):
    image = photo(name, top, left, h, w)
    # The hard case of method §13.18: many exact-zero responses inside real 8-bit photos.
    c0, c1 = sobel_reference(image[0, 1].numpy())
    assert np.mean(c0[1:-1, 1:-1] == 0) > 0.005 or np.mean(c1[1:-1, 1:-1] == 0) > 0.005
    cells = (4, 8, 16, 32)
    for cell, out in zip(cells, hog_multiscale(image, nbins, cells), strict=True):
        assert_close(out, hog_reference_batch(image.numpy(), nbins, cell))


# ------------------------------------------------------------------------------------------ invariance and bias


def test_normalize_matches_numpy():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = normalize(images)
    assert out.dtype == torch.float32
    assert_close(out, normalize_reference(images.numpy()), tol=1e-6)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("nbins", [9, 18])
def test_hog_invariant_to_normalisation_without_bias(nbins):
    images = ramp_noise_uint8(3, 64, 64, seed=nbins)
    cells = (2, 4, 8, 16, 32)
    from_uint8 = hog_multiscale(images, nbins, cells)
    from_float = hog_multiscale(normalize(images), nbins, cells)
    for a, b in zip(from_uint8, from_float, strict=True):
        assert_close(a, b.double().numpy(), tol=1e-5)


@pytest.mark.parametrize("nbins", [9, 18])
def test_hog_with_bias_normalises_uint8_first(nbins):
    image = torch.cat([photo("china.jpg", 150, 300, 64, 64), photo("flower.jpg", 200, 100, 64, 64)])
    bias = make_hog_bias(torch.Generator().manual_seed(nbins))
    normed = normalize(image)
    for cell in (4, 16):
        ref = hog_reference_batch(normed.double().numpy(), nbins, cell, bias.double().numpy())
        assert_close(hog(image, nbins, cell, bias), ref)
        assert_close(hog(normed, nbins, cell, bias), ref)
        # the bias really changes the target (it breaks the affine invariance)
        assert (hog(image, nbins, cell, bias) - hog(image, nbins, cell)).abs().max() > 0.05


# ------------------------------------------------------------------------------------------ multi-scale paths


@pytest.mark.parametrize("as_float", [False, True])
def test_multiscale_equals_single_scale(as_float):
    images = photo("china.jpg", 100, 200, 64, 64).repeat(2, 1, 1, 1)
    images[1] = images[1].flip(-1)
    images = normalize(images) if as_float else images
    g = torch.Generator().manual_seed(3)
    cells = (4, 8, 16, 32)
    for biases in (None, [make_hog_bias(g), None, make_hog_bias(g), None]):
        outs = hog_multiscale(images, 18, cells, biases)
        for k, (cell, out) in enumerate(zip(cells, outs, strict=True)):
            single = hog(images, 18, cell, None if biases is None else biases[k])
            assert (out - single).abs().max() <= 1e-6


def test_memory_layout_does_not_matter():
    images = photo("flower.jpg", 150, 250, 64, 64).repeat(2, 1, 1, 1)
    for other in (images.to(memory_format=torch.channels_last), images.transpose(2, 3).contiguous().transpose(2, 3)):
        for a, b in zip(hog_multiscale(images, 9, (4, 16)), hog_multiscale(other, 9, (4, 16)), strict=True):
            assert torch.equal(a, b)


def test_hog_from_pooled_fp32_and_fp16():
    images = torch.cat([photo("china.jpg", 100, 200, 224, 224), photo("flower.jpg", 150, 250, 224, 224)])
    nbins, cells = 9, (4, 8, 16, 32)
    pooled = pool_cells(pixel_histograms(images, nbins), 4)  # [B, 27, 56, 56] un-normalised
    assert (cell_histograms(images, nbins, 4) - pooled).abs().max() <= 1e-4  # magnitudes up to ~1400
    direct = [hog(images, nbins, c) for c in cells]
    for out, ref in zip(hog_from_pooled(pooled, nbins, 4, cells), direct, strict=True):
        assert (out - ref).abs().max() <= 1e-6
    # fp16 storage: relative rounding 2^-11 per stored value, <= 1e-3 after normalisation
    for out, ref in zip(hog_from_pooled(pooled.half(), nbins, 4, cells), direct, strict=True):
        assert (out - ref).abs().max() <= 1e-3
    assert (normalize_cells(pooled, nbins) - direct[0]).abs().max() <= 1e-6


def test_hog_from_pooled_non_power_of_two_factors():
    images = dyadic_random(2, 48, 48, seed=9)
    pooled = cell_histograms(images, 9, 2)  # [2, 27, 24, 24]
    for cell, out in zip((2, 6, 12, 24), hog_from_pooled(pooled, 9, 2, (2, 6, 12, 24)), strict=True):
        assert_close(out, hog_reference_batch(images.double().numpy(), 9, cell))


def test_to_tokens_is_row_major():
    fmap = torch.arange(2 * 5 * 3 * 4, dtype=torch.float32).view(2, 5, 3, 4)
    tokens = to_tokens(fmap)
    assert tokens.shape == (2, 12, 5)
    for i in range(3):
        for j in range(4):
            assert torch.equal(tokens[:, i * 4 + j], fmap[:, :, i, j])


def test_hog_output_layout_is_rgb_major():
    image = photo("china.jpg", 100, 200, 32, 32)
    swapped = image[:, [2, 0, 1]]
    a, b = hog(image, 9, 8), hog(swapped, 9, 8)
    assert torch.equal(b[:, 0:9], a[:, 18:27]) and torch.equal(b[:, 9:18], a[:, 0:9])


def test_make_hog_bias():
    draws = torch.stack([make_hog_bias(torch.Generator().manual_seed(s)) for s in range(400)])
    assert draws.shape == (400, 2) and draws.dtype == torch.float32
    assert draws.abs().max() < 1 / 3 and draws.min() < -0.3 and draws.max() > 0.3
    assert torch.equal(make_hog_bias(torch.Generator().manual_seed(7)), make_hog_bias(torch.Generator().manual_seed(7)))


# ------------------------------------------------------------------------------------------ pixel targets


@pytest.mark.parametrize("patch", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_pixel_targets_match_reference(patch, norm_pix):
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(patch))
    out = pixel_targets(images, patch, norm_pix)
    assert out.shape == (2, (32 // patch) * (48 // patch), 3 * patch * patch) and out.dtype == torch.float32
    assert_close(out, pixel_targets_reference(normalize_reference(images.numpy()), patch, norm_pix), tol=1e-4)
    normed = normalize(images)
    assert_close(pixel_targets(normed, patch, norm_pix), pixel_targets_reference(normed.double().numpy(), patch,
                                                                                  norm_pix), tol=1e-4)


def test_pixel_targets_use_unbiased_variance():
    images = torch.zeros(1, 3, 2, 2)
    images[0, 0, 0, 0] = 1.0  # 12 values: one 1, eleven 0 -> unbiased var = 1/12
    out = pixel_targets(images, 2)[0, 0]
    assert out[0].item() == pytest.approx((1 - 1 / 12) / np.sqrt(1 / 12 + 1e-6), rel=1e-5)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_value_error_naming_numbers():
    images = torch.zeros(1, 3, 20, 24, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"cell 8 .*20x24"):
        hog(images, 9, 8)
    with pytest.raises(ValueError, match=r"cell 8 .*20x24"):
        hog_multiscale(images, 9, (4, 8))
    with pytest.raises(ValueError, match=r"4 .*channels|channels.*4"):
        hog(torch.zeros(1, 4, 16, 16), 9, 4)
    with pytest.raises(ValueError, match=r"3 dims"):
        hog(torch.zeros(3, 16, 16), 9, 4)
    with pytest.raises(ValueError, match=r"int32"):
        hog(torch.zeros(1, 3, 16, 16, dtype=torch.int32), 9, 4)
    with pytest.raises(ValueError, match=r"\[2\].*\(3,\)"):
        hog(images, 9, 4, torch.zeros(3))
    with pytest.raises(ValueError, match=r"2 biases for 3 cell"):
        hog_multiscale(images, 9, (1, 2, 4), [None, None])
    with pytest.raises(ValueError, match=r"patch 5 .*20x24"):
        pixel_targets(images, 5)
    with pytest.raises(ValueError, match=r"multiples of the finest cell 4"):
        hog_from_pooled(torch.zeros(1, 27, 8, 8), 9, 4, (4, 6))
    with pytest.raises(ValueError, match=r"54 features, expected 3\*nbins = 27"):
        hog_from_pooled(torch.zeros(1, 54, 8, 8), 9, 4, (4, 8))
    with pytest.raises(ValueError, match=r"nbins"):
        hog(images, 0, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    images = torch.cat([photo("china.jpg", 100, 200, 64, 64), rectangles(1, 64, 64, 0, integer=True)])
    bias = make_hog_bias(torch.Generator().manual_seed(0))
    for inp, b in ((images, None), (normalize(images), None), (images, bias)):
        cpu = hog_multiscale(inp, 18, (4, 8, 16, 32), None if b is None else [b] * 4)
        gpu = hog_multiscale(inp.cuda(), 18, (4, 8, 16, 32), None if b is None else [b.cuda()] * 4)
        for x, y in zip(cpu, gpu, strict=True):
            assert y.is_cuda and (x - y.cpu()).abs().max() <= 1e-5
    assert pixel_targets(images.cuda(), 8).is_cuda

"""CIFAR-10-C corruptions (cifarlens.corruptions): the uint8 contract, severities that grow in
what each corruption claims, seeded randomness, agreement with the reference libraries where
they are at hand (Pillow, scipy, colorsys), and the reader of the official .npy folders."""

from __future__ import annotations

import colorsys
import ctypes
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from cifarlens.corruptions import (
    CORRUPTIONS, FAMILIES, CorruptionsDir, corrupt, list_corruptions, severity_measure,
)
from cifarlens.corruptions import _common, blur, digital, weather
from cifarlens.errors import CifarlensError

PAPER_ORDER = [  # Hendrycks & Dietterich 2019, Figure 1 / the official .npy file stems
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
]
NAMES = list_corruptions()
SEVERITIES = range(1, 6)
HAS_FROST = weather.frost_folder() is not None


def needs_frost(name: str):
    """``name`` as a parameter, skipped for frost when its photographs are not installed."""
    marks = [pytest.mark.skip(reason="frost photographs need: pip install 'cifarlens[corruptions]'")]
    return pytest.param(name, marks=marks if name == "frost" and not HAS_FROST else [])


ALL = [needs_frost(n) for n in NAMES]


def smooth_images(b: int = 8, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (B, C, size, size) of slow sinusoids around mid-grey: little clipping, few edges."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    freq = torch.rand(b, c, 2, generator=g) * 0.4 + 0.05  # rad / px
    phase = torch.rand(b, c, generator=g) * 6.28
    x = 0.5 + 0.3 * torch.sin(freq[..., 0, None, None] * xs + freq[..., 1, None, None] * ys + phase[..., None, None])
    return (x * 255).round().to(torch.uint8)


def noise_images(b: int = 8, c: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    """uint8 (B, C, size, size) uniform noise: all the high-frequency energy a blur can remove."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), generator=g, dtype=torch.uint8)


def high_freq(y: torch.Tensor) -> float:
    """Mean squared difference of neighbouring pixels (both axes)."""
    y = y.float()
    return float(((y[..., 1:, :] - y[..., :-1, :]) ** 2).mean() + ((y[..., 1:] - y[..., :-1]) ** 2).mean())


def change(y: torch.Tensor, x: torch.Tensor) -> float:
    return float((y.float() - x.float()).abs().mean())


def at_each_severity(x: torch.Tensor, name: str) -> list[torch.Tensor]:
    """``name`` at severities 1..5, random ones all drawing the same random numbers."""
    return [corrupt(x, name, s, generator=torch.Generator().manual_seed(7)) for s in SEVERITIES]


def non_decreasing(values: list[float]) -> bool:
    """Each value at least the one before, and the last above the first."""
    return all(b >= a - 1e-9 for a, b in itertools.pairwise(values)) and values[-1] > values[0]


def non_increasing(values: list[float]) -> bool:
    return non_decreasing([-v for v in values])


# -- registry ---------------------------------------------------------------------------------


def test_the_fifteen_in_the_paper_order():
    assert NAMES == PAPER_ORDER
    assert set(CORRUPTIONS.names()) == set(PAPER_ORDER)
    assert [len(list_corruptions(f)) for f in FAMILIES] == [3, 4, 4, 4]
    assert list_corruptions("weather") == ["snow", "frost", "fog", "brightness"]


def test_registry_holds_the_papers_cifar_parameters():
    assert CORRUPTIONS.get("gaussian_noise").levels == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert CORRUPTIONS.get("shot_noise").levels == (500, 250, 100, 75, 50)
    assert CORRUPTIONS.get("jpeg_compression").levels == (80, 65, 58, 50, 40)
    assert CORRUPTIONS.get("glass_blur").levels[3] == (0.25, 1, 2)
    assert CORRUPTIONS.get("elastic_transform").levels[1] == pytest.approx((1.6, 6.4, 2.24))
    # np.arange(1, 1.06, 0.01) in the generator ends at 1.06 (float round-off): 7 factors
    assert len(blur.zoom_factors(1.06)) == 7 and len(blur.zoom_factors(1.26)) == 26
    assert [severity_measure("zoom_blur", s) for s in SEVERITIES] == pytest.approx([1.06, 1.11, 1.15, 1.20, 1.25])


# The paper's motion blur at severities 3 and 4, (radius 6, sigma 2) and (8, 2), differ only in
# kernel weights below 1e-9: the same corruption, in the generator as here.
TIES = {("motion_blur", 4)}


@pytest.mark.parametrize("name", NAMES)
def test_severity_measure_grows(name):
    values = [severity_measure(name, s) for s in range(6)]
    assert values[0] == 0.0
    assert values[1] > 0 or name == "elastic_transform"  # whose severity 1 is an affine warp only
    for s in range(2, 6):
        if (name, s) in TIES:
            assert values[s] == pytest.approx(values[s - 1])
        else:
            assert values[s] > values[s - 1], (s, values)


def test_bad_arguments():
    x = noise_images(2)
    with pytest.raises(CifarlensError, match="unknown corruption"):
        corrupt(x, "spatter", 1)
    with pytest.raises(ValueError, match="severity must be 0..5"):
        corrupt(x, "fog", 6)
    with pytest.raises(ValueError, match="contrast: expected uint8"):
        corrupt(x.float(), "contrast", 1)
    with pytest.raises(ValueError, match="snow: expected uint8 images \\(B, 1\\|3, H, W\\)"):
        corrupt(torch.zeros(2, 2, 32, 32, dtype=torch.uint8), "snow", 1)


# -- the contract, for every corruption -------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_uint8_shape_and_range_preserved(name):
    x = noise_images(4)
    for s in SEVERITIES:
        y = corrupt(x, name, s)
        assert y.dtype == torch.uint8 and y.shape == x.shape and y.device == x.device
        assert not torch.equal(y, x), (name, s)
    gray = corrupt(smooth_images(2, c=1), name, 5)
    assert gray.dtype == torch.uint8 and gray.shape == (2, 1, 32, 32)


@pytest.mark.parametrize("name", ALL)
def test_severity_zero_is_an_unchanged_copy(name):
    x = noise_images(2)
    y = corrupt(x, name, 0)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("name", ALL)
def test_seeds(name):
    x = smooth_images(4)
    a, b = corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=0)
    assert torch.equal(a, b)
    other = corrupt(x, name, 3, seed=1)
    assert torch.equal(a, other) is not CORRUPTIONS.get(name).random  # random ones differ
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(corrupt(x, name, 2, generator=g1), corrupt(x, name, 2, generator=g2))


# -- each corruption grows in what it claims --------------------------------------------------


@pytest.mark.parametrize("name", list_corruptions("noise"))
def test_noise_std_grows(name):
    x = smooth_images()
    stds = [float((y.float() - x.float()).std()) for y in at_each_severity(x, name)]
    assert non_decreasing(stds), stds


@pytest.mark.parametrize("name", ["defocus_blur", "motion_blur", "zoom_blur"])
def test_blur_removes_high_frequencies(name):
    x = noise_images()
    energy = [high_freq(x)] + [high_freq(y) for y in at_each_severity(x, name)]
    # (motion blur's severities 3 and 4 differ only in weights below 1e-9: the same images)
    assert non_increasing(energy) and energy[-1] < 0.5 * energy[0], energy


def test_glass_blur_blurs_within_iterations_and_moves_more_with_more():
    # The paper's sigmas (0.05, 0.25, 0.4, 0.25, 0.4) rise within one and two iterations of copies.
    x = noise_images()
    energy = [high_freq(y) for y in at_each_severity(x, "glass_blur")]
    assert energy[0] > energy[1] > energy[2] and energy[3] > energy[4], energy
    s = smooth_images()
    moved = [change(y, s) for y in at_each_severity(s, "glass_blur")]
    assert max(moved[:3]) < min(moved[3:]), moved


@pytest.mark.parametrize("name", ["snow", "fog", "brightness", "contrast", "pixelate", "jpeg_compression"])
def test_change_from_the_clean_image_grows(name):
    x = smooth_images() if name != "jpeg_compression" else noise_images()
    changes = [change(y, x) for y in at_each_severity(x, name)]
    assert non_decreasing(changes), changes


@pytest.mark.skipif(not HAS_FROST, reason="frost photographs need: pip install 'cifarlens[corruptions]'")
def test_frost_hides_the_image_more():
    # the same crops at every severity: the image's share falls, so its correlation does
    x = smooth_images().float().flatten(1)
    corr = []
    for y in at_each_severity(smooth_images(), "frost"):
        y = y.float().flatten(1)
        c = ((x - x.mean(1, keepdim=True)) * (y - y.mean(1, keepdim=True))).mean(1) / (x.std(1) * y.std(1))
        corr.append(float(c.mean()))
    assert non_increasing(corr), corr


def test_elastic_displacement_grows():
    # The paper's affine jitter falls with severity (2.56 -> 0.96 px), so the total change need
    # not grow; the elastic part, what severity_measure reports, does.
    x = smooth_images()
    c = CORRUPTIONS.get("elastic_transform")
    changes = [change(digital.elastic_transform(x, (a, s, 0.0), torch.Generator().manual_seed(7)), x)
               for a, s, _ in c.levels]
    assert changes[0] == 0.0 and non_decreasing(changes), changes
    assert [lv[2] for lv in c.levels] == sorted((lv[2] for lv in c.levels), reverse=True)


def test_every_corruption_has_a_behaviour_test():
    tested = (set(list_corruptions("noise")) | {"defocus_blur", "motion_blur", "zoom_blur", "glass_blur", "frost",
              "elastic_transform", "snow", "fog", "brightness", "contrast", "pixelate", "jpeg_compression"})
    assert tested == set(NAMES)


# -- agreement with the operations the generator used ------------------------------------------


def test_pixelate_is_pillows_box_resize():
    x = noise_images(4)
    for factor in CORRUPTIONS.get("pixelate").levels:
        n = int(32 * factor)
        ref = np.stack([np.asarray(Image.fromarray(a.permute(1, 2, 0).numpy()).resize((n, n), Image.BOX)
                                   .resize((32, 32), Image.BOX)) for a in x])
        assert torch.equal(digital.pixelate(x, factor), torch.from_numpy(ref).permute(0, 3, 1, 2))


def test_brightness_is_an_hsv_value_shift():
    x = noise_images(1)
    a = x[0].permute(1, 2, 0).numpy() / 255.0
    hsv = [[colorsys.rgb_to_hsv(*p) for p in row] for row in a]
    ref = np.array([[colorsys.hsv_to_rgb(h, s, min(v + 0.2, 1)) for h, s, v in row] for row in hsv])
    ref = torch.from_numpy(np.clip(ref, 0, 1) * 255).permute(2, 0, 1)
    # truncation: float64 may land just under a whole number that we (exactly) reach
    assert (weather.brightness(x, 0.2)[0].double() - ref).abs().max() < 1.0 + 1e-6


def test_clipped_zoom_is_scipys_zoom():
    x = noise_images(1).float() / 255
    a = x[0].permute(1, 2, 0).numpy()
    for z in (1.04, 1.05, 1.11, 1.25, 2.25):
        ch = int(np.ceil(32 / z))
        top = (32 - ch) // 2
        ref = ndimage.zoom(a[top : top + ch, top : top + ch], (z, z, 1), order=1)
        t = (ref.shape[0] - 32) // 2
        ours = blur.clipped_zoom(x, z)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, ref[t : t + 32, t : t + 32], atol=1e-5)


@pytest.mark.parametrize(("sigma", "truncate", "mode"),
                         [(0.4, 4.0, "nearest"), (6.4, 3.0, "reflect"), (1.0, 4.0, "mirror")])
def test_gaussian_filter_is_scipys(sigma, truncate, mode):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = ndimage.gaussian_filter(x.double().numpy(), (0, 0, sigma, sigma), truncate=truncate, mode=mode)
    np.testing.assert_allclose(_common.gaussian_filter(x, sigma, truncate=truncate, mode=mode).numpy(), ref, atol=1e-5)


def test_defocus_kernels():
    small = blur.defocus_kernel(0.3, 0.4)  # a one-pixel disk: just the 3x3 anti-alias Gaussian
    g = torch.exp(-0.5 * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / 0.4**2)
    torch.testing.assert_close(small, torch.outer(g, g) / g.sum() ** 2)
    big = blur.defocus_kernel(1.5, 0.1)  # x^2 + y^2 <= 2.25: the full 3x3 block
    assert float(big.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(big[1:4, 1:4], torch.full((3, 3), 1 / 9, dtype=torch.float64), atol=1e-6, rtol=0)


def test_glass_blur_copies_from_up_left_neighbours():
    # sigma 0.05 blurs nothing: each pixel the loop visits takes itself, the one above, left or up-left
    x = noise_images(4)
    y = blur.glass_blur(x, (0.05, 1, 1), torch.Generator().manual_seed(0))
    assert torch.equal(y[..., :2, :], x[..., :2, :]) and torch.equal(y[..., :, :2], x[..., :, :2])
    shifts = torch.stack([x, x.roll(1, -2), x.roll(1, -1), x.roll((1, 1), (-2, -1))])  # (4, B, C, H, W)
    pixel_match = (shifts == y).all(dim=2)  # whole pixels move: (4, B, H, W)
    assert pixel_match[:, :, 2:, 2:].any(dim=0).all()
    assert pixel_match[1:, :, 2:, 2:].any(dim=0).float().mean() > 0.5  # most come from a neighbour


def test_motion_blur_is_imagemagicks_one_sided_streak():
    k = blur.motion_kernel(6, 2)
    assert len(k) == 13 and float(k.sum()) == pytest.approx(1.0) and bool((k[1:] < k[:-1]).all())
    dot = torch.zeros(1, 1, 32, 32)
    dot[..., 16, 16] = 1.0
    out = blur.motion_blur_layer(dot, 6, 2, torch.tensor([0.0]))
    # out(y, x) averages in(y, x + i): the dot streaks towards smaller x
    torch.testing.assert_close(out[0, 0, 16, 4:17].flip(0), k.float())
    assert float(out.sum()) == pytest.approx(1.0)
    down = blur.motion_blur_layer(dot, 6, 2, torch.tensor([90.0]))
    torch.testing.assert_close(down[0, 0, 4:17, 16].flip(0), k.float())


def test_motion_blur_matches_imagemagick():
    """Where Wand and ImageMagick are installed: our rebuild against the MotionBlurImage the paper called."""
    wand_image = pytest.importorskip("wand.image")  # also skips when the MagickWand library is missing
    from wand.api import library

    library.MagickMotionBlurImage.argtypes = (ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double)
    x = torch.cat([smooth_images(2), noise_images(2)])
    angles = [-45.0, -20.5, 0.0, 33.3]
    for radius, sigma in CORRUPTIONS.get("motion_blur").levels:
        blurred = blur.motion_blur_layer(x.float() / 255, radius, sigma, torch.tensor(angles))
        ours = _common.to_uint8(blurred.clamp(0, 1))
        for image, angle, mine in zip(x, angles, ours):
            png = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(png, format="PNG")
            with wand_image.Image(blob=png.getvalue()) as magick:
                library.MagickMotionBlurImage(magick.wand, radius, sigma, angle)
                ref = np.array(Image.open(io.BytesIO(magick.make_blob("png"))).convert("RGB"))
            diff = (torch.from_numpy(ref).permute(2, 0, 1).int() - mine.int()).abs()
            assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.98, (radius, sigma, angle)


def test_elastic_without_displacement_or_affine_is_the_identity():
    x = noise_images(2)
    assert torch.equal(digital.elastic_transform(x, (0.0, 0.0, 0.0), torch.Generator().manual_seed(0)), x)


def test_plasma_fractal():
    m = weather.plasma_fractal(3, 32, 2.0, np.random.default_rng(0))
    assert m.shape == (3, 32, 32)
    np.testing.assert_allclose(m.min(axis=(1, 2)), 0)
    np.testing.assert_allclose(m.max(axis=(1, 2)), 1)


def test_frost_without_its_photographs_says_how_to_get_them(monkeypatch):
    monkeypatch.setattr(weather, "frost_folder", lambda: None)
    weather.frost_textures.cache_clear()
    try:
        with pytest.raises(CifarlensError, match=r"pip install 'cifarlens\[corruptions\]'"):
            corrupt(noise_images(1), "frost", 1)
    finally:
        weather.frost_textures.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_on_the_gpu_as_on_the_cpu(name):
    x = smooth_images(4)
    y = corrupt(x.cuda(), name, 3)
    assert y.device.type == "cuda" and y.dtype == torch.uint8 and y.shape == x.shape
    # same seeds on the CPU generator: the same result up to float round-off (1 level)
    assert (y.cpu().int() - corrupt(x, name, 3).int()).abs().float().mean() < 0.05


# -- the official .npy folders ----------------------------------------------------------------


def write_corruptions_dir(path: Path, images: np.ndarray, labels: np.ndarray, names) -> Path:
    """The official layout: labels.npy and <name>.npy (uint8 (5N, 32, 32, 3)), severity 1 first."""
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "labels.npy", labels)
    for name in names:
        np.save(path / f"{name}.npy", images)
    return path


N = 4  # images per severity


@pytest.fixture
def cifar_c(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5 * N, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(rng.integers(0, 10, N), 5).astype(np.uint8)  # the generator saved uint8 labels
    names = ["jpeg_compression", "fog", "gaussian_noise", "spatter", "speckle_noise"]  # + 2 of the 4 extras
    return write_corruptions_dir(tmp_path / "CIFAR-10-C", images, labels, names), images, labels


def test_npy_round_trip(cifar_c):
    path, images, labels = cifar_c
    d = CorruptionsDir(path)
    assert d.corruptions() == ["gaussian_noise", "fog", "jpeg_compression"]  # paper order, extras left out
    assert d.num_classes == 10 and d.per_severity == N and d.check() == d.corruptions()
    for severity in SEVERITIES:
        x, y = d.load("fog", severity)
        rows = slice((severity - 1) * N, severity * N)
        assert x.dtype == torch.uint8 and x.shape == (N, 3, 32, 32) and y.dtype == torch.int64
        assert torch.equal(x, torch.from_numpy(images[rows]).permute(0, 3, 1, 2))
        assert torch.equal(y, torch.from_numpy(labels[rows].astype(np.int64)))


def one_line_error(fn, *args) -> str:
    with pytest.raises(CifarlensError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_npy_truncated_file(cifar_c):
    path, _, _ = cifar_c
    file = path / "fog.npy"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    message = one_line_error(CorruptionsDir(path).load, "fog", 1)
    assert str(file) in message and "expected uint8 (20, 32, 32, 3)" in message
    with open(file, "r+b") as f:
        f.truncate(40)  # inside the header
    assert str(file) in one_line_error(CorruptionsDir(path).load, "fog", 2)
    assert str(file) in one_line_error(CorruptionsDir(path).check)


@pytest.mark.parametrize("bad", [np.zeros((5 * N, 32, 32), np.uint8), np.zeros((5 * N - 1, 32, 32, 3), np.uint8),
                                 np.zeros((5 * N, 32, 32, 3), np.float32), np.zeros((5 * N, 3, 32, 32), np.uint8)])
def test_npy_wrong_shape_or_dtype(cifar_c, bad):
    path, _, _ = cifar_c
    np.save(path / "fog.npy", bad)
    message = one_line_error(CorruptionsDir(path).load, "fog", 1)
    assert str(path / "fog.npy") in message and "expected uint8 (20, 32, 32, 3)" in message


def test_npy_refuses_pickles(cifar_c):
    path, _, _ = cifar_c
    np.save(path / "fog.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert str(path / "fog.npy") in one_line_error(CorruptionsDir(path).load, "fog", 1)


def test_npy_folder_errors(cifar_c, tmp_path):
    path, _, _ = cifar_c
    assert "no such CIFAR-C folder" in one_line_error(CorruptionsDir, tmp_path / "nowhere")
    d = CorruptionsDir(path)
    assert str(path / "contrast.npy") in one_line_error(d.load, "contrast", 1)
    assert "unknown corruption 'spatter'" in one_line_error(d.load, "spatter", 1)
    assert "severity must be 1..5" in one_line_error(d.load, "fog", 0)
    (path / "labels.npy").unlink()
    assert str(path / "labels.npy") in one_line_error(CorruptionsDir, path)


@pytest.mark.parametrize("labels", [np.array([0, 1, 2, -1] * 5), np.array([0, 1, 2, 100] * 5),
                                    np.array([0, 1, 2] * 5 + [3]), np.zeros((5, 4), np.int64),
                                    np.zeros(20, np.float32)])
def test_npy_bad_labels(cifar_c, labels):
    path, _, _ = cifar_c
    np.save(path / "labels.npy", labels)
    assert str(path / "labels.npy") in one_line_error(CorruptionsDir, path)


def test_npy_labels_beyond_num_classes(cifar_c):
    path, _, _ = cifar_c
    np.save(path / "labels.npy", np.array([0, 1, 2, 10] * 5))
    assert CorruptionsDir(path).num_classes == 100  # inferred: a CIFAR-100-C folder
    assert "outside 0..9" in one_line_error(CorruptionsDir, path, 10)

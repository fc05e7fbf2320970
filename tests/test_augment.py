import pytest
import torch

from cifarlens.data.augment import AUGMENT_LEVELS, BatchAugment, colour_jitter, normalize, random_crop, random_hflip
from cifarlens.errors import CifarlensError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ramp_images(b=8, c=3, h=8, w=8):
    # every pixel distinct and > 0, so crops/flips can be located exactly
    base = torch.arange(1, h * w + 1, dtype=torch.uint8).view(1, 1, h, w)
    return base.repeat(b, c, 1, 1) + torch.arange(c, dtype=torch.uint8).view(1, c, 1, 1)


def test_normalize_uses_per_channel_stats():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(images, (0.5, 0.0, 1.0), (0.5, 1.0, 2.0))
    assert out[0, :, 0, 0].tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_normalize_constants_are_shared_and_safe_to_differentiate_through():
    # made once per (values, device, dtype) and then reused; first made here under inference_mode
    mean, std = (0.125, 0.25, 0.375), (0.5, 0.75, 2.0)  # values no other test uses
    with torch.inference_mode():
        normalize(torch.zeros((1, 3, 2, 2)), mean, std)
    x = torch.rand((2, 3, 2, 2), requires_grad=True)
    normalize(x, mean, std).sum().backward()  # fails if the cached std were an inference tensor
    assert torch.allclose(x.grad[:, :, 0, 0], 1 / torch.tensor(std).expand(2, 3))


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    images = ramp_images()
    out = random_crop(images, 2, gen())
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2,) * 4)
    for i in range(len(images)):
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], out[i])]
        assert windows, f"image {i} is not a crop of its padded original"
    # with 25 possible offsets, 8 images should not all get the same one
    assert len({out[i].sum().item() for i in range(len(images))}) > 1


def test_random_hflip_flips_about_half_exactly():
    images = ramp_images(b=400)
    out = random_hflip(images, gen())
    flipped = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, images)])
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((flipped | same).all())
    assert 150 < int(flipped.sum()) < 250


def test_colour_jitter_stays_in_range_and_changes_images():
    x = torch.rand(16, 3, 8, 8, generator=gen(1))
    out = colour_jitter(x, 0.4, gen())
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("level", list(AUGMENT_LEVELS))
def test_levels_are_deterministic_under_a_seed(level):
    aug = BatchAugment(level, (0.5,) * 3, (0.25,) * 3)
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=gen(3))
    a, b = aug(images, gen(7)), aug(images, gen(7))
    assert a.dtype == torch.float32 and a.shape == images.shape
    assert torch.equal(a, b)
    if level == "none":
        assert torch.allclose(a, normalize(images, (0.5,) * 3, (0.25,) * 3))
    else:
        assert not torch.equal(a, aug(images, gen(8)))


def test_no_flip_for_datasets_that_forbid_it():
    aug = BatchAugment("flip", (0.0,), (1.0,), hflip=False)
    images = ramp_images(c=1)
    assert torch.allclose(aug(images, gen()), images.float() / 255)


def test_unknown_level_is_a_user_error():
    with pytest.raises(CifarlensError, match="augmentation level"):
        BatchAugment("wild", (0.5,), (0.5,))


def test_per_image_path_matches_the_batched_path_without_augmentation():
    from cifarlens.data.base import DatasetInfo, Split
    from cifarlens.data.perimage import PerImageLoader

    info = DatasetInfo("t", ("a", "b"), 3, 12, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    images = torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8, generator=gen(2))
    split = Split(images, torch.arange(10) % 2)
    loader = PerImageLoader(split, info, 5, "none", 4, device=torch.device("cpu"), num_workers=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    # shuffled, so compare sorted by a per-image key
    expected = normalize(images, info.mean, info.std)
    order_x = torch.argsort(x.flatten(1).sum(1))
    order_e = torch.argsort(expected.flatten(1).sum(1))
    assert torch.allclose(x[order_x], expected[order_e], atol=1e-5)
    assert sorted(y.tolist()) == sorted(split.labels.tolist())
    # a split smaller than one batch is one batch, as on the batched path (it was none: no step trained)
    small = PerImageLoader(split, info, 16, "none", 4, device=torch.device("cpu"), num_workers=0)
    assert len(small) == 1 and [len(b[1]) for b in small] == [10]


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    from cifarlens.data.base import Split
    from cifarlens.data.loader import TensorLoader

    n = 200
    images = ramp_images(b=n, c=1)
    split = Split(images, torch.arange(n))  # the label is the image's index
    augment = BatchAugment("flip", (0.0,), (1 / 255,), alternating_flip=True)  # normalised = the raw values

    def flips(loader, epoch) -> torch.Tensor:
        loader.set_epoch(epoch)
        state = torch.zeros(n, dtype=torch.bool)
        for x, y in loader:
            state[y] = torch.tensor([torch.allclose(a, images[0].flip(2).float()) for a in x])
        return state

    loader = TensorLoader(split, 32, augment, device=torch.device("cpu"), shuffle=True, seed=5)
    epochs = [flips(loader, e) for e in range(4)]
    assert 0.35 < epochs[0].float().mean() < 0.65  # epoch 0: a coin toss per image
    assert torch.equal(epochs[1], ~epochs[0]) and torch.equal(epochs[2], epochs[0]) and torch.equal(epochs[3], ~epochs[0])
    again = TensorLoader(split, 32, augment, device=torch.device("cpu"), shuffle=True, seed=5)
    assert torch.equal(flips(again, 3), epochs[3])  # a pure function of (seed, epoch): resumable
    other = TensorLoader(split, 32, augment, device=torch.device("cpu"), shuffle=True, seed=6)
    assert not torch.equal(flips(other, 0), epochs[0])


def test_alternating_flip_is_a_config_choice_of_the_batched_loader():
    from cifarlens.config import DataConfig
    from cifarlens.data.base import DatasetInfo, Split
    from cifarlens.data.pipeline import make_loader

    info = DatasetInfo("x", ("a", "b"), 1, 8, (0.5,), (0.5,))
    split = Split(ramp_images(b=64, c=1), torch.zeros(64, dtype=torch.long))
    loader = make_loader(split, info, 16, torch.device("cpu"), train_cfg=DataConfig(augment="flip", flip="alternating"))
    assert loader.flip_base is not None and loader.flip_base.shape == (64,)
    with pytest.raises(CifarlensError, match="unknown data.flip .*choose one of: random, alternating"):
        make_loader(split, info, 16, torch.device("cpu"), train_cfg=DataConfig(flip="sometimes"))
    with pytest.raises(CifarlensError, match="needs the batched loader"):
        make_loader(split, info, 16, torch.device("cpu"), train_cfg=DataConfig(flip="alternating", loader="perimage"))

import pytest
import torch

from cifarlens.data.split import stratified_split
from cifarlens.errors import CifarlensError


def test_split_is_stratified_disjoint_complete_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train, val = stratified_split(labels, 0.1, seed=3)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    assert torch.bincount(labels[val]).tolist() == [5, 3, 2]
    again_train, again_val = stratified_split(labels, 0.1, seed=3)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    _, other_val = stratified_split(labels, 0.1, seed=4)
    assert not torch.equal(val, other_val)


def test_every_class_keeps_a_sample_on_both_sides():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    train, val = stratified_split(labels, 0.05, seed=0)
    assert set(labels[val].tolist()) == {0, 1, 2}
    assert set(labels[train].tolist()) == {0, 1, 2}


def test_fraction_zero_means_no_validation_split():
    labels = torch.tensor([2, 0, 1, 1, 0])
    train, val = stratified_split(labels, 0.0, seed=0)
    assert train.tolist() == [0, 1, 2, 3, 4] and len(val) == 0 and val.dtype == torch.int64


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_bad_fraction(fraction):
    with pytest.raises(CifarlensError, match="val_fraction"):
        stratified_split(torch.tensor([0, 1]), fraction, seed=0)


def test_an_image_signature_tells_other_images_from_the_same_decoded_otherwise():
    """One mean and spread per image took a mirrored, rotated or channel-swapped image for itself."""
    import numpy as np

    from cifarlens.data.base import Split
    from cifarlens.data.fingerprint import changed_positions, image_signatures

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (1, 3, 32, 32), generator=g, dtype=torch.uint8)
    base[:, 0, :, :16] //= 2  # a darker left half of red: not symmetric
    noise = torch.randint(-2, 3, base.shape, generator=g)  # what another JPEG decoder changes
    variants = {
        "decoded otherwise": (base.int() + noise).clamp(0, 255).to(torch.uint8),
        "mirrored": base.flip(3), "rotated": base.rot90(1, (2, 3)), "channels swapped": base[:, [2, 1, 0]],
    }
    recorded = image_signatures(Split(base, torch.zeros(1, dtype=torch.int64)))
    assert recorded.shape == (1, 3 + 4 + 1)
    for name, images in variants.items():
        now = image_signatures(Split(images, torch.zeros(1, dtype=torch.int64)))
        expected = [] if name == "decoded otherwise" else [0]
        assert changed_positions(recorded, now).tolist() == expected, name
    assert changed_positions(recorded, np.zeros((2, 8), np.float32)) is None  # another number of images: unknown

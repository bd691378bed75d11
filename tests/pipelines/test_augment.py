"""Device stage parity against PIL / torchvision on the same uint8 images, and its random statistics."""
import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from dataset_tools.synthetic import class_image
from pipelines.augment import (BRANCHES, AugParams, DeviceStage, augment, color_jitter, draw_params, gaussian_blur,
                               grayscale, normalize, solarize, to_float)
from pipelines.config import AugConfig


@pytest.fixture(scope="module")
def images():
    """Eight 80x96 (HxW) textured RGB images (uint8 HWC) with sharp edges, so blur and jitter have something to do."""
    rng = np.random.default_rng(0)
    return [np.array(class_image(k, 8, rng, (96, 80))) for k in range(8)]


def batch(imgs) -> torch.Tensor:
    """Float NHWC on the 0..255 scale, the layout the stage's operations work in."""
    return to_float(torch.from_numpy(np.stack(imgs)))


def back(x: torch.Tensor) -> np.ndarray:
    return x.numpy().astype(np.float64)


def chw01(x: torch.Tensor) -> torch.Tensor:
    """One NHWC 0..255 image as torchvision's CHW 0..1 tensor."""
    return x.permute(2, 0, 1) / 255


def test_grayscale_equals_pil(images):
    ref = np.stack([np.asarray(Image.fromarray(im).convert("L").convert("RGB")) for im in images])
    np.testing.assert_array_equal(back(grayscale(batch(images))), ref)


def test_solarize_equals_pil(images):
    ref = np.stack([np.asarray(ImageOps.solarize(Image.fromarray(im), 128)) for im in images])
    np.testing.assert_array_equal(back(solarize(batch(images), 128)), ref)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5, 2.0])
def test_blur_close_to_pil_gaussian_blur(images, sigma):
    """PIL's GaussianBlur is an extended-box approximation of a Gaussian with std = radius; ours is the Gaussian.
    Tolerance: mean |diff| <= 0.75 grey levels; more than 8 px from the border, max |diff| <= 6 (at the border
    PIL's box passes treat edges differently: up to ~20 levels on a few pixels)."""
    x = batch(images)
    out = back(gaussian_blur(x, torch.full((len(images),), sigma)))
    ref = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(sigma))) for im in images])
    d = np.abs(out - ref)
    assert d.mean() <= 0.75, d.mean()
    assert d[:, 8:-8, 8:-8].max() <= 6, d[:, 8:-8, 8:-8].max()


def test_blur_branch_subset_and_whole_batch_agree(images):
    """The CPU path convolves only the blur branch's samples, the GPU path all of them and selects: same result."""
    from pipelines.augment import _blur_branch

    g = torch.Generator().manual_seed(3)
    p = draw_params(len(images), g, hflip=0.5, three_augment=True, blur_sigma=(0.1, 2.0), color_jitter=0.3)
    assert (p.branch == 2).any() and (p.branch != 2).any()
    x = batch(images)
    torch.testing.assert_close(_blur_branch(x, p, 2.0, subset=True), _blur_branch(x, p, 2.0, subset=False))


def test_blur_is_per_sample(images):
    x = batch(images[:2])
    both = gaussian_blur(x, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(both[0], gaussian_blur(x[:1], torch.tensor([0.5]))[0])
    torch.testing.assert_close(both[1], gaussian_blur(x[1:], torch.tensor([2.0]))[0])


@pytest.mark.parametrize("op, tv", [(0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)])
def test_jitter_ops_equal_torchvision(images, op, tv):
    """One op at a time (the other two factors 1.0, i.e. identity), against torchvision's functional op."""
    x = batch(images)
    f = torch.ones(len(images), 3)
    f[:, op] = torch.linspace(0.7, 1.3, len(images))
    out = color_jitter(x, f, torch.tensor([[0, 1, 2]] * len(images)))
    for i in range(len(images)):
        torch.testing.assert_close(chw01(out[i]), tv(chw01(x[i]), float(f[i, op])), atol=5e-6, rtol=0)


def test_jitter_applies_each_samples_own_order(images):
    x = batch(images[:6])
    perms = torch.tensor(list(itertools.permutations(range(3))))  # all 6 orders, one per sample
    factors = torch.tensor([[1.25, 0.75, 1.2]] * 6)
    out = color_jitter(x, factors, perms)
    tv = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(6):
        ref = chw01(x[i])
        for op in perms[i].tolist():
            ref = tv[op](ref, float(factors[i, op]))
        torch.testing.assert_close(chw01(out[i]), ref, atol=5e-6, rtol=0)
    assert len({out[i].sum().item() for i in range(6)}) == 6  # the order matters


def test_random_parameters_statistics():
    g = torch.Generator().manual_seed(0)
    p = draw_params(60_000, g, hflip=0.5, three_augment=True, blur_sigma=(0.1, 2.0), color_jitter=0.3)
    freq = torch.bincount(p.branch, minlength=3).float() / 60_000
    assert torch.all((freq - 1 / 3).abs() < 0.03), freq
    assert abs(p.flip.float().mean().item() - 0.5) < 0.02
    assert p.jitter.min() >= 0.7 and p.jitter.max() <= 1.3
    assert abs(p.jitter.mean().item() - 1.0) < 0.01
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    orders = {tuple(o) for o in p.jitter_order.tolist()}
    assert orders == set(itertools.permutations(range(3)))
    off = draw_params(100, g, hflip=0.5, three_augment=False, blur_sigma=(0.1, 2.0), color_jitter=0.3)
    assert (off.branch == -1).all()


def test_augment_takes_exactly_the_drawn_branch(images):
    x = batch(images[:3])
    p = AugParams(flip=torch.tensor([False, True, False]), branch=torch.tensor([0, 1, 2]),
                  sigma=torch.tensor([1.0, 1.0, 1.5]), jitter=torch.ones(3, 3), jitter_order=torch.zeros(3, 3).long())
    out = augment(x, p, color_jitter_on=False)
    torch.testing.assert_close(out[0], grayscale(x[:1])[0])
    torch.testing.assert_close(out[1], solarize(x[1:2].flip(2))[0])
    torch.testing.assert_close(out[2], gaussian_blur(x[2:3], torch.tensor([1.5]))[0])


def test_normalize_equals_torchvision(images):
    x = batch(images)
    ours = normalize(x, torch.float32)
    assert ours.shape == (8, 3, 80, 96)
    for i, im in enumerate(images):
        ref = TF.normalize(TF.to_tensor(im), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert normalize(x, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_device_stage_train_and_eval(images, compiled):
    u8 = torch.from_numpy(np.stack(images))
    train = DeviceStage(AugConfig(), train=True, compile=compiled)
    a, pa = train(u8, torch.Generator().manual_seed(1))
    b, pb = train(u8, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)  # same generator state, same batch
    assert pa.branch.tolist() == pb.branch.tolist() and set(pa.branch.tolist()) <= {0, 1, 2}
    assert a.is_contiguous(memory_format=torch.channels_last) and a.shape == (8, 3, 80, 96)
    ev, none = DeviceStage(AugConfig(), train=False)(u8)
    assert none is None
    torch.testing.assert_close(ev, normalize(to_float(u8), torch.float32))
    assert len(BRANCHES) == 3
    if compiled:  # the compiled stage computes what the eager one does
        eager, _ = DeviceStage(AugConfig(), train=True)(u8, torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, eager, atol=1e-4, rtol=0)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_train_stage_equals_the_reference_composition(images, compiled):
    """The fused, sliced train stage (with the default AugConfig) against the official per-sample order built from
    reference ops on the parameters the stage returns: flip (torchvision) -> the sample's one 3-Augment branch
    (PIL grayscale, PIL solarize at 128, the Gaussian blur at its sigma) -> torchvision's brightness, contrast and
    saturation in the sample's order -> torchvision's normalise. 40 samples, past the CPU slice of 16."""
    u8 = torch.from_numpy(np.stack(images * 5))
    stage = DeviceStage(AugConfig(), train=True, compile=compiled)
    out, p = stage(u8, torch.Generator().manual_seed(3))
    assert set(p.branch.tolist()) == {0, 1, 2} and p.flip.any() and not p.flip.all()
    jitter_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(len(u8)):
        img = u8[i].numpy()
        if p.flip[i]:
            img = img[:, ::-1].copy()
        branch = BRANCHES[int(p.branch[i])]
        if branch == "grayscale":
            ref = chw01(torch.from_numpy(np.array(Image.fromarray(img).convert("L").convert("RGB"))).float())
        elif branch == "solarize":
            ref = chw01(torch.from_numpy(np.array(ImageOps.solarize(Image.fromarray(img), 128))).float())
        else:
            ref = chw01(gaussian_blur(to_float(torch.from_numpy(img))[None], p.sigma[i:i + 1])[0])
        for op in p.jitter_order[i].tolist():
            ref = jitter_ops[op](ref, float(p.jitter[i, op]))
        ref = TF.normalize(ref, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0, msg=f"sample {i} ({branch})")

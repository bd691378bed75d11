"""BatchAugment: parity against PIL / torchvision on the same uint8 images, its random statistics, and the keying
contract of its ops' draws (ops.py)."""

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from dataset_tools.synthetic import class_image
from pipelines import keys
from pipelines.augment import (
    BRANCHES,
    BatchAugment,
    Flip,
    FlipParams,
    ThreeAugment,
    ThreeAugmentParams,
    augment,
    color_jitter,
    normalize,
    to_float,
    train_ops,
)
from pipelines.config import AugConfig
from pipelines.ops import AugOp, AugParams, OpParams, op_generator
from pipelines.pixels import gaussian_blur, grayscale, solarize


@pytest.fixture(scope="module")
def images():
    """Eight 80x96 (HxW) textured RGB images (uint8 HWC) with sharp edges, so blur and jitter have something to do."""
    rng = np.random.default_rng(0)
    return [np.array(class_image(k, 8, rng, (96, 80))) for k in range(8)]


def batch(imgs) -> torch.Tensor:
    """Float NHWC on the 0..255 scale, the layout the augmentation's operations work in."""
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
    op = ThreeAugment((0.1, 2.0))
    p = op.draw(len(images), torch.Generator().manual_seed(3))
    assert (p.branch == 2).any() and (p.branch != 2).any()
    x = batch(images)
    torch.testing.assert_close(op.blur(x, p, subset=True), op.blur(x, p, subset=False))


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
    p = BatchAugment(AugConfig(), train=True).draw(60_000, 0, torch.device("cpu"))
    three, jitter = p["three_augment"], p["color_jitter"]
    freq = torch.bincount(three.branch, minlength=3).float() / 60_000
    assert torch.all((freq - 1 / 3).abs() < 0.03), freq
    assert abs(p["flip"].flip.float().mean().item() - 0.5) < 0.02
    assert jitter.factors.min() >= 0.7 and jitter.factors.max() <= 1.3
    assert abs(jitter.factors.mean().item() - 1.0) < 0.01
    assert three.sigma.min() >= 0.1 and three.sigma.max() <= 2.0
    orders = {tuple(o) for o in jitter.order.tolist()}
    assert orders == set(itertools.permutations(range(3)))
    # 3-Augment off: the op is not run and draws nothing; the flip and the jitter draw what they drew with it on.
    off = BatchAugment(AugConfig(three_augment=False), train=True).draw(60_000, 0, torch.device("cpu"))
    assert list(off) == ["flip", "color_jitter"]
    assert torch.equal(off["flip"].flip, p["flip"].flip) and torch.equal(off["color_jitter"].order, jitter.order)


def test_augment_takes_exactly_the_drawn_branch(images):
    x = batch(images[:3])
    p = AugParams(
        flip=FlipParams(torch.tensor([False, True, False])),
        three_augment=ThreeAugmentParams(branch=torch.tensor([0, 1, 2]), sigma=torch.tensor([1.0, 1.0, 1.5])),
    )
    out = augment(x, [Flip(0.5), ThreeAugment((0.1, 2.0))], p)  # no jitter op: the branches alone
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
def test_batch_augment_train_and_eval(images, compiled):
    u8 = torch.from_numpy(np.stack(images))
    train = BatchAugment(AugConfig(), train=True, compile=compiled)
    a, pa = train(u8, 1)
    b, pb = train(u8, 1)
    torch.testing.assert_close(a, b)  # same batch key, same batch
    branch = pa["three_augment"].branch
    assert branch.tolist() == pb["three_augment"].branch.tolist() and set(branch.tolist()) <= {0, 1, 2}
    assert a.is_contiguous(memory_format=torch.channels_last) and a.shape == (8, 3, 80, 96)
    ev, none = BatchAugment(AugConfig(), train=False)(u8)
    assert none is None
    torch.testing.assert_close(ev, normalize(to_float(u8), torch.float32))
    assert len(BRANCHES) == 3
    if compiled:  # compiled, it computes what it computes eagerly
        eager, _ = BatchAugment(AugConfig(), train=True)(u8, 1)
        torch.testing.assert_close(a, eager, atol=1e-4, rtol=0)


def test_the_pointwise_ops_fuse_into_one_graph(images):
    """What keeps the training augmentation fast: the ops' pointwise parts and the normalisation, with their
    parameters as arguments, trace as one graph with no break (torch.compile then fuses it into a few passes)."""
    import torch._dynamo

    augment = BatchAugment(AugConfig(), train=True)
    p = augment.draw(len(images), 0, torch.device("cpu"))
    scale, shift = augment._scale_shift(torch.device("cpu"))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(augment._eager_fused)(
        batch(images), [p[op.name] for op in augment.ops], scale, shift, torch.float32
    )
    assert [op.name for op in augment._tail] == ["flip", "three_augment", "color_jitter"]
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_training_batch_augment_equals_the_reference_composition(images, compiled):
    """The fused, sliced training BatchAugment (with the default AugConfig) against the official per-sample order
    built from reference ops on the parameters it returns: flip (torchvision) -> the sample's one 3-Augment branch
    (PIL grayscale, PIL solarize at 128, the Gaussian blur at its sigma) -> torchvision's brightness, contrast and
    saturation in the sample's order -> torchvision's normalise. 40 samples, past the CPU slice of 16."""
    u8 = torch.from_numpy(np.stack(images * 5))
    out, p = BatchAugment(AugConfig(), train=True, compile=compiled)(u8, 3)
    flips, three, jitter = p["flip"].flip, p["three_augment"], p["color_jitter"]
    assert set(three.branch.tolist()) == {0, 1, 2} and flips.any() and not flips.all()
    jitter_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(len(u8)):
        img = u8[i].numpy()
        if flips[i]:
            img = img[:, ::-1].copy()
        branch = BRANCHES[int(three.branch[i])]
        if branch == "grayscale":
            ref = chw01(torch.from_numpy(np.array(Image.fromarray(img).convert("L").convert("RGB"))).float())
        elif branch == "solarize":
            ref = chw01(torch.from_numpy(np.array(ImageOps.solarize(Image.fromarray(img), 128))).float())
        else:
            ref = chw01(gaussian_blur(to_float(torch.from_numpy(img))[None], three.sigma[i : i + 1])[0])
        for op in jitter.order[i].tolist():
            ref = jitter_ops[op](ref, float(jitter.factors[i, op]))
        ref = TF.normalize(ref, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0, msg=f"sample {i} ({branch})")


# ---- the keying contract (ops.py): each op draws from its own stream, keyed by the batch key and its name ------------

POLICY = "rand-m9-mstd0.5-inc1"


@dataclass
class FakeParams(OpParams):
    u: torch.Tensor  # (B, 4)


class Fake(AugOp):
    """A new op, as a later change would add one: draws like the others (torch.rand on its generator), changes
    nothing, so the batch it leaves must be the batch without it."""

    name = "fake"

    def draw(self, batch, g):
        return FakeParams(torch.rand(batch, 4, generator=g, device=g.device))


def _equal(a: AugParams, b: AugParams, names) -> bool:
    return all(all(torch.equal(s, t) for s, t in zip(a[n].tensors(), b[n].tensors())) for n in names)


@pytest.mark.parametrize("where", [0, 2, 4])
def test_adding_an_op_leaves_every_other_ops_draws_unchanged(images, where):
    """Every op of a fine-tuning + 3-Augment + jitter stage (flip, RandAugment, 3-Augment, jitter) draws bit for bit
    the same parameters for the same batch key with a new op added before, among or after them; and the batch it
    makes is the same. Under the old single generator an op added before the others shifted all their draws."""
    aug = AugConfig(img_size=72, auto_augment=POLICY)
    ops = train_ops(aug)
    assert [op.name for op in ops] == ["flip", "randaugment", "three_augment", "color_jitter"]
    u8 = torch.from_numpy(np.concatenate([images] * 3)[:, :72, :72])
    base, pb = BatchAugment(aug, train=True, ops=ops)(u8, 11)
    more, pm = BatchAugment(aug, train=True, ops=ops[:where] + [Fake()] + ops[where:])(u8, 11)
    assert list(pm) == [op.name for op in ops[:where]] + ["fake"] + [op.name for op in ops[where:]]
    assert _equal(pb, pm, [op.name for op in ops])
    assert torch.equal(base, more)
    # And removing one: without 3-Augment the other three draw what they drew with it.
    fewer = BatchAugment(aug, train=True, ops=[op for op in ops if op.name != "three_augment"]).draw(len(u8), 11, "cpu")
    assert _equal(pb, fewer, ["flip", "randaugment", "color_jitter"])


def test_each_op_draws_from_its_own_named_stream():
    """An op's draws are those of a generator seeded with keys.named(batch key, op name): the same op under another
    name, or for another batch key, draws other numbers; two ops may not share a name (they would share a stream).
    The name's key is pinned: changing how names are hashed would change every run's augmentation."""
    cpu = torch.device("cpu")
    p = BatchAugment(AugConfig(), train=True, ops=[Fake()]).draw(64, 5, cpu)["fake"].u
    assert torch.equal(p, Fake().draw(64, op_generator(5, "fake", cpu)).u)
    g = torch.Generator().manual_seed(keys.seed_of(keys.combine(np.uint64(5), keys.name_key("fake"))))
    assert torch.equal(p, torch.rand(64, 4, generator=g))

    class Renamed(Fake):
        name = "fake2"

    assert not torch.equal(p, BatchAugment(AugConfig(), train=True, ops=[Renamed()]).draw(64, 5, cpu)["fake2"].u)
    assert not torch.equal(p, BatchAugment(AugConfig(), train=True, ops=[Fake()]).draw(64, 6, cpu)["fake"].u)

    class SharesFlipsStream(Fake):
        name = "flip"

    with pytest.raises(ValueError, match="share a name"):
        BatchAugment(AugConfig(), train=True, ops=[Flip(0.5), SharesFlipsStream()])
    assert int(keys.name_key("flip")) == NAME_KEY_FLIP


NAME_KEY_FLIP = 17926043167403759251  # keys.name_key("flip") when the keying was introduced

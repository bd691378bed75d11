"""Models: sizes of the paper's table, the official init, and loading official / timm / our checkpoints."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath

from deit3_fast.models import ARCHS, CheckpointError, create_model, load_checkpoint


@pytest.mark.parametrize(
    "name, millions",
    [
        ("deit3_small", 22.0),
        ("deit3_medium", 38.8),
        ("deit3_base", 86.6),
        ("deit3_large", 304.4),
        ("deit3_huge", 632.1),
    ],
)
def test_parameter_counts_match_the_paper(name, millions):
    with torch.device("meta"):  # no memory, no init cost: only the shapes matter here
        model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - millions) < 0.1, n


def test_official_init():
    torch.manual_seed(0)
    m = create_model("deit3_micro", num_classes=10, img_size=64, drop_path=0.2)
    grid = (64 // 8) ** 2
    assert m.pos_embed.shape == (1, grid, 192)  # no class-token slot
    for block in m.blocks:
        assert torch.all(block.ls1.gamma == 1e-4) and torch.all(block.ls2.gamma == 1e-4)
        assert isinstance(block.drop_path1, DropPath) and block.drop_path1.drop_prob == 0.2
        assert isinstance(block.drop_path2, DropPath) and block.drop_path2.drop_prob == 0.2
        assert block.norm1.eps == 1e-6 and block.attn.qkv.bias is not None
    # trunc_normal_(std=0.02) as the official code calls it: timm's bounds are absolute (-2, 2), so it is in effect
    # a plain normal with std 0.02 (cls_token: 192 values, hence the wider band).
    for t in (m.pos_embed, m.cls_token, m.blocks[0].mlp.fc1.weight):
        assert 0.015 < t.std().item() < 0.025 and abs(t.mean().item()) < 0.005
    assert torch.all(m.blocks[0].attn.proj.bias == 0) and torch.all(m.norm.weight == 1)


def test_forward_channels_last_and_no_drop_path_when_zero():
    m = create_model("deit3_nano", num_classes=7, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    out = m(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 7)
    torch.testing.assert_close(out, m(x))
    assert not any(isinstance(mod, DropPath) for mod in m.modules())


def _official_checkpoint(model, path):
    """A checkpoint as the official code writes it: key 'model', LayerScale as gamma_1/gamma_2, args beside."""
    sd = {}
    for k, v in model.state_dict().items():
        sd[k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = v.clone()
    torch.save({"model": sd, "args": argparse.Namespace(model="deit_small_patch16_LS"), "epoch": 799}, path)


def official_pos_embed_resize(pos_embed, new_grid):
    """The official fine-tuning code's resize (main.py), no extra tokens for DeiT III."""
    d = pos_embed.shape[-1]
    old = int(pos_embed.shape[1] ** 0.5)
    tokens = pos_embed.reshape(-1, old, old, d).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return tokens.permute(0, 2, 3, 1).flatten(1, 2)


def test_official_checkpoint_loads_at_another_resolution_with_new_head(tmp_path):
    src = create_model("deit3_micro", num_classes=1000, img_size=64)
    src.blocks[1].ls1.gamma.data.fill_(0.5)  # distinguishable from the init
    _official_checkpoint(src, tmp_path / "official.pth")
    dst = create_model("deit3_micro", num_classes=10, img_size=96, checkpoint=str(tmp_path / "official.pth"))
    assert torch.all(dst.blocks[1].ls1.gamma == 0.5)
    torch.testing.assert_close(dst.blocks[2].attn.qkv.weight, src.blocks[2].attn.qkv.weight)
    torch.testing.assert_close(dst.pos_embed, official_pos_embed_resize(src.pos_embed, 96 // 8))
    assert dst.head.weight.shape == (10, 192)  # the 1000-class head was dropped, the new one is at its init
    same = create_model("deit3_micro", num_classes=1000, img_size=64, checkpoint=str(tmp_path / "official.pth"))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(same.eval()(x), src.eval()(x))


def test_timm_and_compiled_ddp_prefixes_load(tmp_path):
    src = create_model("deit3_nano", num_classes=5, img_size=32)
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "a.pt")
    dst = create_model("deit3_nano", num_classes=5, img_size=32)
    assert load_checkpoint(dst, str(tmp_path / "a.pt")) == []
    torch.testing.assert_close(dst.head.weight, src.head.weight)


def test_a_safetensors_file_loads_as_model_checkpoint(tmp_path):
    """An export's model.safetensors (or a timm hub file) as model.checkpoint: every weight, at another resolution
    with pos_embed resized and a head of another size dropped, as for the other kinds of file."""
    from safetensors.torch import save_file

    src = create_model("deit3_nano", num_classes=5, img_size=32)
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    same = create_model("deit3_nano", num_classes=5, img_size=32, checkpoint=str(tmp_path / "model.safetensors"))
    for k, v in src.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k
    other = create_model("deit3_nano", num_classes=3, img_size=48)
    assert load_checkpoint(other, str(tmp_path / "model.safetensors")) == ["head.weight", "head.bias"]
    assert other.pos_embed.shape[1] == (48 // 4) ** 2  # resized from 8 x 8 patches to 12 x 12
    torch.testing.assert_close(other.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    m = create_model("deit3_nano", num_classes=5, img_size=32)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(m, str(tmp_path / "absent.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(m, str(tmp_path / "junk.pth"))
    other = create_model("deit3_micro", num_classes=5, img_size=32)
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not fit|does not match"):
        load_checkpoint(m, str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="deit3_small"):
        create_model("vit_gigantic")
    assert set(ARCHS) >= {"deit3_small", "deit3_medium", "deit3_base", "deit3_large", "deit3_huge"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, arch, size",
    [
        ("deit3_small_patch16_224", "deit3_small", 224),
        ("deit3_base_patch16_384", "deit3_base", 384),
        ("deit3_medium_patch16_224", "deit3_medium", 224),
        ("deit3_large_patch16_384", "deit3_large", 384),
        ("deit3_huge_patch14_224", "deit3_huge", 224),
        ("deit3_base_patch16_224.fb_in22k_ft_in1k", "deit3_base", 224),
        ("deit_small_patch16_LS", "deit3_small", None),
        ("deit_huge_patch14_LS", "deit3_huge", None),
        ("deit3_large", "deit3_large", None),
    ],
)
def test_timm_and_official_names_build_the_same_architecture(name, arch, size):
    """The names users type (timm's, whose suffix is the default resolution, and the official models_v2.py ones)
    build our architecture with the official init, the same parameters as timm's model of that name."""
    import timm

    from deit3_fast.models import resolve_name

    assert resolve_name(name) == (arch, size)
    timm_name = name.split(".")[0] if size else f"{arch}_patch{ARCHS[arch][0]}_224"
    with torch.device("meta"):
        ours, theirs = create_model(name), timm.create_model(timm_name)
    assert ours.patch_embed.img_size == (size or 224,) * 2
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_patch_grid_is_floored_like_the_official_code():
    """ViT-H/14 pre-trains at 160 (11 x 11 patches) and 128 (9 x 9): the stride-14 convolution ignores the last
    pixels, and the output equals the model run on the image cropped to the grid."""
    m = create_model("deit3_nano", num_classes=3, img_size=30).eval()  # patch 4: 7 x 7 over 28 of 30 pixels
    assert m.patch_embed.grid_size == (7, 7) and m.pos_embed.shape[1] == 49
    x = torch.randn(2, 3, 30, 30)
    y = x.clone()
    y[..., 28:, :] = 0
    y[..., :, 28:] = 0
    torch.testing.assert_close(m(x), m(y))
    with pytest.raises(ValueError, match="smaller than deit3_nano's patch size 4"):
        create_model("deit3_nano", img_size=3)

"""`deit3_fast.lamb` and `deit3_fast.optim`: `Lamb` against a float64 per-parameter reference of apex `FusedLAMB`,
the DeiT III weight-decay split, and `build_optimizer`.

The reference is written out from apex's csrc/multi_tensor_lamb.cu (adam_w_mode=1, grad_averaging=1,
use_nvlamb=False) as a plain loop, so it shares no code with the foreach implementation under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from deit3_fast.lamb import Lamb
from deit3_fast.optim import build_optimizer, param_groups_weight_decay

# float64 everywhere: the two implementations differ only in rounding order, ~1e-15 relative per step.
RTOL, ATOL = 1e-10, 1e-12


class RefLamb:
    """apex FusedLAMB maths, one parameter at a time, in float64 numpy."""

    def __init__(self, groups, lr, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0, bias_correction=True):
        self.p = [[np.array(x, dtype=np.float64) for x in ps] for ps, _ in groups]
        self.wd = [wd for _, wd in groups]
        self.m = [[np.zeros_like(x) for x in ps] for ps in self.p]
        self.v = [[np.zeros_like(x) for x in ps] for ps in self.p]
        self.t = [0] * len(groups)
        self.lr, self.betas, self.eps, self.max_grad_norm = lr, betas, eps, max_grad_norm
        self.bias_correction = bias_correction
        self.global_norms: list[float] = []
        self.ratios: list[list[float]] = []  # trust ratios applied, per step, decay-group params only

    def step(self, grads):
        b1, b2 = self.betas
        g_norm = math.sqrt(sum(float(np.sum(g * g)) for gs in grads for g in gs if g is not None))
        self.global_norms.append(g_norm)
        clip = g_norm / self.max_grad_norm if self.max_grad_norm > 0 and g_norm > self.max_grad_norm else 1.0
        ratios = []
        for gi, gs in enumerate(grads):
            self.t[gi] += 1  # every group advances, with or without gradients
            t, wd = self.t[gi], self.wd[gi]
            bc1 = 1 - b1**t if self.bias_correction else 1.0
            bc2 = 1 - b2**t if self.bias_correction else 1.0
            for j, g in enumerate(gs):
                if g is None:
                    continue
                p = self.p[gi][j]
                g = g / clip
                m = self.m[gi][j] = b1 * self.m[gi][j] + (1 - b1) * g
                v = self.v[gi][j] = b2 * self.v[gi][j] + (1 - b2) * g * g
                update = (m / bc1) / (np.sqrt(v / bc2) + self.eps) + wd * p
                ratio = 1.0
                if wd != 0:
                    w_norm, u_norm = np.linalg.norm(p), np.linalg.norm(update)
                    ratio = w_norm / u_norm if w_norm != 0 and u_norm != 0 else 1.0
                    ratios.append(ratio)
                self.p[gi][j] = p - self.lr * ratio * update
        self.ratios.append(ratios)


SHAPES_DECAY = [(4, 5), (3, 3, 2), (16, 8), (6,)]  # index 3 starts all zeros
SHAPES_NO_DECAY = [(5,), (2, 3), (1,)]  # index 2 sometimes has no grad


def _init(seed=0):
    rng = np.random.default_rng(seed)
    decay = [rng.standard_normal(s) for s in SHAPES_DECAY]
    decay[3][:] = 0.0
    no_decay = [rng.standard_normal(s) * 0.1 for s in SHAPES_NO_DECAY]
    return decay, no_decay


def _grad_schedule(steps, seed=1):
    """Random grads with a scale per step: mostly around the clip threshold, one all-zero step, huge and tiny norms."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(steps):
        scale = {0: 0.05, 3: 1e3, 4: 1e-3, 10: 0.0, 11: 50.0}.get(k, float(10 ** rng.uniform(-2, 1)))
        gd = [rng.standard_normal(s) * scale for s in SHAPES_DECAY]
        gn = [rng.standard_normal(s) * scale for s in SHAPES_NO_DECAY]
        if k == 0:
            gd[3][:] = 0.0  # zero param + zero grad on step 1: both norms 0 -> ratio 1
        if k % 7 == 5:
            gn[2] = None  # skipped: no state update, not in the global norm
        if k == 20:
            gn = [None] * len(gn)  # a whole group without grads still advances its step (apex)
        out.append((gd, gn))
    return out


def _torch_params(decay, no_decay, dtype=torch.float64, device="cpu"):
    return (
        [torch.nn.Parameter(torch.tensor(x, dtype=dtype, device=device)) for x in decay],
        [torch.nn.Parameter(torch.tensor(x, dtype=dtype, device=device)) for x in no_decay],
    )


def _set_grads(params, grads, dtype=torch.float64, device="cpu"):
    for p, g in zip(params, grads):
        p.grad = None if g is None else torch.tensor(g, dtype=dtype, device=device)


def _scaled(grads, scale):
    return [None if g is None else g * scale for g in grads]


def _amp_args(grad_scale, found_inf, device="cpu"):
    """What torch.amp.GradScaler.step hands an optimiser with `_step_supports_amp_scaling`: the scale as a float32
    device tensor and the inf/NaN flag as a float32 0/1 device tensor."""
    return {
        "grad_scale": torch.full((), grad_scale, dtype=torch.float32, device=device),
        "found_inf": torch.full((), float(found_inf), dtype=torch.float32, device=device),
    }


def _run_both(
    steps=50,
    lr=0.01,
    wd=0.05,
    max_grad_norm=1.0,
    bias_correction=True,
    dtype=torch.float64,
    rtol=RTOL,
    atol=ATOL,
    device="cpu",
    compile=False,
    grad_scale=None,
):
    """Our Lamb against the float64 reference of apex's maths, step by step (on `device`, optionally compiled).
    `grad_scale`: our Lamb gets the gradients multiplied by it and the scale (and a clear inf flag) as GradScaler
    hands them over, the reference the plain gradients."""
    decay, no_decay = _init()
    ref = RefLamb([(decay, wd), (no_decay, 0.0)], lr=lr, max_grad_norm=max_grad_norm, bias_correction=bias_correction)
    pd, pn = _torch_params(decay, no_decay, dtype, device)
    opt = Lamb(
        [{"params": pd, "weight_decay": wd}, {"params": pn, "weight_decay": 0.0}],
        lr=lr,
        max_grad_norm=max_grad_norm,
        bias_correction=bias_correction,
        compile=compile,
    )
    for k, (gd, gn) in enumerate(_grad_schedule(steps)):
        if grad_scale is None:
            _set_grads(pd, gd, dtype, device)
            _set_grads(pn, gn, dtype, device)
            opt.step()
        else:
            _set_grads(pd + pn, _scaled(gd + gn, grad_scale), dtype, device)
            opt.step(**_amp_args(grad_scale, False, device))
        ref.step([gd, gn])
        for got, want in zip(pd + pn, ref.p[0] + ref.p[1]):
            np.testing.assert_allclose(
                got.detach().double().cpu().numpy(), want, rtol=rtol, atol=atol, err_msg=f"step {k + 1}"
            )
    return ref, opt, pd, pn


def test_matches_apex_reference_float64():
    ref, opt, pd, pn = _run_both(steps=50)
    norms = np.array(ref.global_norms)
    assert (norms > 1.0).any() and ((norms < 1.0) & (norms > 0)).any() and (norms == 0).any()
    assert ref.ratios[0][3] == 1.0  # all-zero param on step 1
    assert any(abs(r - 1.0) > 1e-3 for rs in ref.ratios for r in rs)  # trust ratio really active
    assert [int(g["step"]) for g in opt.param_groups] == [50, 50]
    np.testing.assert_allclose(opt.state[pd[0]]["exp_avg"].numpy(), ref.m[0][0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(opt.state[pn[1]]["exp_avg_sq"].numpy(), ref.v[1][1], rtol=RTOL, atol=1e-18)


def test_matches_reference_without_bias_correction():
    _run_both(steps=12, bias_correction=False)


def test_clipping_disabled_with_zero_max_grad_norm():
    ref, *_ = _run_both(steps=20, max_grad_norm=0.0)
    assert max(ref.global_norms) > 100  # huge grads went through unclipped
    # ... and the clipped run really is different (so the line above tests something).
    clipped, *_ = _run_both(steps=20, max_grad_norm=1.0)
    assert not np.allclose(ref.p[0][0], clipped.p[0][0])


def test_float32_close_to_reference():
    _run_both(steps=20, dtype=torch.float32, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [2.0**16, 1000.0], ids=["pow2", "other"])
def test_scaled_gradients_step_as_the_unscaled_ones(scale):
    """Gradients times S with grad_scale=S (GradScaler's fp16 path) take the step the plain gradients would: the
    float64 reference on unscaled gradients to the same 1e-10 as unscaled steps, over 50 steps with clipped and
    unclipped norms, huge and tiny ones, missing gradients and a group without any. (GradScaler's scales are powers
    of two, where the unscaling is exact; another scale costs a rounding.)"""
    _run_both(steps=50, grad_scale=scale)
    _run_both(steps=12, grad_scale=scale, max_grad_norm=0.0)  # unclipped: the divisor is the scale alone


def test_scaled_gradients_float32():
    _run_both(steps=20, dtype=torch.float32, rtol=1e-4, atol=1e-5, grad_scale=2.0**16)


def _lamb_state(params, opt):
    """Parameters, both moments (zeros before the first step creates them) and step counts, copied."""
    moments = [opt.state[p].get(k, torch.zeros_like(p)).clone() for p in params for k in ("exp_avg", "exp_avg_sq")]
    counts = [torch.as_tensor(g.get("step", 0), dtype=torch.float32).clone() for g in opt.param_groups]
    return [p.detach().clone() for p in params] + moments + counts


@pytest.mark.parametrize("bad_step", [0, 6], ids=["first-step", "later"])
def test_found_inf_skips_the_whole_step(bad_step):
    """A step whose gradients hold an inf and a NaN, flagged by found_inf, leaves parameters, both moments and the
    step counts bit-identical (also as the very first step, whose bias correction would be 1 - beta^0 = 0), and the
    run then goes on bit for bit as one that never saw that step."""
    decay, no_decay = _init()
    scale = 2.0**12

    def make():
        pd, pn = _torch_params(decay, no_decay)
        return pd + pn, Lamb([{"params": pd, "weight_decay": 0.05}, {"params": pn, "weight_decay": 0.0}], lr=0.01)

    def step(params, opt, grads, bad=False):
        _set_grads(params, _scaled(grads, scale))
        if bad:
            params[0].grad[0, 0] = math.inf
            params[-2].grad[1, 2] = math.nan
        opt.step(**_amp_args(scale, bad))

    clean_params, clean = make()
    params, opt = make()
    for k, (gd, gn) in enumerate(_grad_schedule(12)):
        if k == bad_step:
            before = _lamb_state(params, opt)
            step(params, opt, gd + gn, bad=True)
            for a, b in zip(before, _lamb_state(params, opt)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        step(clean_params, clean, gd + gn)
        step(params, opt, gd + gn)
    assert [int(g["step"]) for g in opt.param_groups] == [12, 12]
    for a, b in zip(_lamb_state(clean_params, clean), _lamb_state(params, opt)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _two_group_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    return model, Lamb(param_groups_weight_decay(model, 0.05), lr=0.01, weight_decay=0.05)


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    return model(torch.randn(16, 6, generator=g) * 3).pow(2).mean()


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscale_-then-step"])
def test_grad_scaler_hands_the_step_to_lamb(unscale_first, monkeypatch):
    """torch.amp.GradScaler (on the CPU here, as the trainer builds it) lets Lamb unscale and skip: nothing is read
    back on the host in scaler.step, three good steps match Lamb on unscaled gradients, and an overflowing one is
    skipped whole while the scaler backs off. Also where unscale_ ran before step (to clip or log gradients): then
    GradScaler passes no scale, only the inf flag."""
    model, opt = _two_group_model()
    plain_model, plain = _two_group_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    params = list(model.parameters())
    for k in range(4):
        overflow = k == 2
        loss = _loss(model, k) * (math.inf if overflow else 1.0)
        scaler.scale(loss).backward()
        before = _lamb_state(params, opt)
        with monkeypatch.context() as m:
            _forbid_host_reads(m)
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        if overflow:
            for a, b in zip(before, _lamb_state(params, opt)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert scaler.get_scale() == 2.0**9
        else:
            _loss(plain_model, k).backward()
            plain.step()
            plain.zero_grad()
    assert [int(g["step"]) for g in opt.param_groups] == [3, 3]
    for a, b in zip(params, plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_trust_ratio_only_with_weight_decay():
    """Step 1 in closed form: m_hat = g, v_hat = g^2. Same tensors, wd=0.05 vs wd=0: only the former is rescaled."""
    torch.manual_seed(0)
    p0, g = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64) * 0.1  # norm < clip
    lr, wd, eps = 0.01, 0.05, 1e-8
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    opt = Lamb(
        [{"params": [a], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}], lr=lr, eps=eps, max_grad_norm=10.0
    )
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    adam = g / (g.abs() + eps)
    upd = adam + wd * p0
    torch.testing.assert_close(a.detach(), p0 - lr * (p0.norm() / upd.norm()) * upd, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.detach(), p0 - lr * adam, rtol=1e-12, atol=1e-14)


def test_zero_param_gets_ratio_one():
    p = torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))
    g = torch.linspace(-0.2, 0.2, 15, dtype=torch.float64).reshape(5, 3)
    opt = Lamb([p], lr=0.1, weight_decay=0.05)
    p.grad = g
    opt.step()
    torch.testing.assert_close(p.detach(), -0.1 * g / (g.abs() + 1e-8), rtol=1e-12, atol=1e-14)


def test_global_clip_spans_groups():
    """Two groups whose grads are each below the clip but whose global norm is not: both get scaled."""
    a = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = Lamb([{"params": [a]}, {"params": [b]}], lr=1.0, betas=(0.5, 0.5), eps=0.0, max_grad_norm=1.0)
    a.grad, b.grad = torch.tensor([0.6], dtype=torch.float64), torch.tensor([0.8 * 2], dtype=torch.float64)
    g_norm = math.hypot(0.6, 1.6)
    opt.step()
    # eps=0, one step: update = sign(g) regardless of scale, so check the moments instead.
    torch.testing.assert_close(opt.state[a]["exp_avg"], torch.tensor([0.5 * 0.6 / g_norm], dtype=torch.float64))
    torch.testing.assert_close(opt.state[b]["exp_avg"], torch.tensor([0.5 * 1.6 / g_norm], dtype=torch.float64))


def test_grads_left_untouched_and_none_grad_skipped():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(3))
    b_before = b.detach().clone()
    opt = Lamb([a, b], lr=0.1, weight_decay=0.05, max_grad_norm=1.0)
    g = torch.randn(4, 4) * 100
    a.grad = g.clone()
    opt.step()
    torch.testing.assert_close(a.grad, g, rtol=0, atol=0)
    torch.testing.assert_close(b.detach(), b_before, rtol=0, atol=0)
    assert b not in opt.state or len(opt.state[b]) == 0


def _forbid_host_reads(monkeypatch):
    """Every way a scalar is read back from a tensor raises (on a GPU each would wait for the device)."""

    def boom(*_a, **_k):
        raise AssertionError("host read of a tensor")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, boom)


@pytest.mark.parametrize("amp", [None, "finite", "found-inf"])
def test_step_does_not_sync(monkeypatch, amp):
    """No scalar is read back from a tensor: in a plain step, nor with fp16's grad_scale and found_inf (clear or
    set), whose skip is decided on the device."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]
    opt = Lamb([{"params": params[:1], "weight_decay": 0.05}, {"params": params[1:], "weight_decay": 0.0}])
    for p in params:
        p.grad = torch.randn_like(p) * 10
    kw = {} if amp is None else _amp_args(2.0**16, amp == "found-inf")
    _forbid_host_reads(monkeypatch)
    opt.step(**kw)
    opt.step(**kw)


@pytest.mark.parametrize("counts", ["tensors", "ints"])
def test_state_dict_round_trip(counts):
    """A saved and reloaded optimiser continues bit for bit; also from a checkpoint written before the step counts
    were device tensors (ints in its param_groups)."""
    decay, no_decay = _init(seed=3)
    schedule = _grad_schedule(30, seed=4)

    def make():
        pd, pn = _torch_params(decay, no_decay)
        opt = Lamb([{"params": pd, "weight_decay": 0.05}, {"params": pn, "weight_decay": 0.0}], lr=0.01)
        return pd + pn, opt

    def run(params, opt, steps):
        for gd, gn in steps:
            _set_grads(params, gd + gn)
            opt.step()

    params_a, opt_a = make()
    run(params_a, opt_a, schedule)

    params_b, opt_b = make()
    run(params_b, opt_b, schedule[:13])
    saved_params = [p.detach().clone() for p in params_b]
    saved_state = opt_b.state_dict()
    if counts == "ints":
        saved_state["param_groups"] = [{**g, "step": int(g["step"])} for g in saved_state["param_groups"]]
    params_c, opt_c = make()  # fresh process stand-in: new params and optimiser, then load
    with torch.no_grad():
        for p, s in zip(params_c, saved_params):
            p.copy_(s)
    opt_c.load_state_dict(saved_state)
    assert [int(g["step"]) for g in opt_c.param_groups] == [13, 13]
    run(params_c, opt_c, schedule[13:])
    for pa, pc in zip(params_a, params_c):
        torch.testing.assert_close(pa, pc, rtol=0, atol=0)


def _tiny_deit3():
    return timm.create_model(
        "deit3_small_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=10,
    )


def test_param_groups_weight_decay_deit3():
    model = _tiny_deit3()
    groups = param_groups_weight_decay(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    ids = [{id(p) for p in g["params"]} for g in groups]
    names = {"decay": set(), "no_decay": set()}
    for n, p in model.named_parameters():
        names["decay" if id(p) in ids[0] else "no_decay"].add(n)
        assert (id(p) in ids[0]) != (id(p) in ids[1]), n  # each param in exactly one group

    no_decay, decay = names["no_decay"], names["decay"]
    for n in (
        "pos_embed",
        "cls_token",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
        "head.bias",
        "blocks.0.ls1.gamma",
        "blocks.0.ls2.gamma",
        "blocks.1.norm1.weight",
        "blocks.1.attn.qkv.bias",
    ):
        assert n in no_decay, n
    for n in (
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.weight",
        "head.weight",
    ):
        assert n in decay, n
    assert all(model.get_parameter(n).ndim > 1 for n in decay)


def test_param_groups_skip_frozen_and_wrapped():
    model = torch.nn.Sequential(_tiny_deit3())  # names gain a "0." prefix
    model[0].head.weight.requires_grad_(False)
    groups = param_groups_weight_decay(model, 0.1)
    all_ids = {id(p) for g in groups for p in g["params"]}
    assert id(model[0].head.weight) not in all_ids
    assert id(model[0].pos_embed) in {id(p) for p in groups[1]["params"]}


def test_build_optimizer():
    model = _tiny_deit3()
    lamb = build_optimizer("lamb", model, lr=4e-3, weight_decay=0.05)
    assert isinstance(lamb, Lamb) and lamb.defaults["max_grad_norm"] == 1.0
    assert [g["weight_decay"] for g in lamb.param_groups] == [0.05, 0.0]
    adamw = build_optimizer("adamw", model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    assert adamw.defaults["betas"] == (0.9, 0.98) and adamw.defaults["eps"] == 1e-6

    x = torch.randn(2, 3, 32, 32)
    for opt in (lamb, adamw):  # one real step on the model runs
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()

    with pytest.raises(ValueError, match="lamb.*adamw"):
        build_optimizer("sgd", model, lr=0.1, weight_decay=0.0)


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_the_optim_section_builds_with_every_value_it_holds(name):
    """OptimConfig.build (what the run's optimiser is made by) passes every key on: none left at its default."""
    from deit3_fast.optim import OptimConfig

    o = OptimConfig(name=name, lr=2e-3, weight_decay=0.2, betas=(0.8, 0.95), eps=1e-6, max_grad_norm=3.0)
    opt = o.build(_tiny_deit3())
    assert isinstance(opt, Lamb if name == "lamb" else torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups] == [
        (2e-3, 0.2, (0.8, 0.95), 1e-6),
        (2e-3, 0.0, (0.8, 0.95), 1e-6),
    ]
    if name == "lamb":
        assert opt.defaults["max_grad_norm"] == 3.0


@pytest.mark.parametrize(
    "kw", [{"lr": -1.0}, {"betas": (1.0, 0.999)}, {"eps": -1.0}, {"weight_decay": -0.1}, {"max_grad_norm": -1.0}]
)
def test_invalid_hyperparameters(kw):
    with pytest.raises(ValueError):
        Lamb([torch.nn.Parameter(torch.zeros(2))], **kw)


@pytest.mark.slow  # torch.compile of the update: ~20 s on 2 CPU cores
def test_compiled_step_matches_eager():
    """The torch.compile path runs the same maths: 5 steps with a changing lr and both groups agree with eager to
    float32 rounding, and a new lr or step count does not recompile (they are tensors, not constants)."""
    torch.manual_seed(0)
    shapes = [(64, 48), (48,), (32, 64, 3), (7,)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * (k + 1) for s in shapes] for k in range(5)]

    def run(compile):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = Lamb(
            [{"params": params[::2], "weight_decay": 0.05}, {"params": params[1::2], "weight_decay": 0.0}],
            lr=0.01,
            max_grad_norm=1.0,
            compile=compile,
        )
        for k, gs in enumerate(grads):
            for g in opt.param_groups:
                g["lr"] = 0.01 * (k + 1)
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()
        return params, opt

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # process-wide: earlier tests' compilations count there too
    with torch._dynamo.config.patch(error_on_recompile=False):
        eager, _ = run(False)
        compiled, opt = run(True)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= frames <= 2  # one graph per parameter group, compiled once


@pytest.mark.slow  # torch.compile of the update, twice: ~40 s on 2 CPU cores
def test_compiled_step_with_grad_scaler_matches_eager():
    """The compiled update unscales and skips as the eager one does: scaled gradients with a flagged inf/NaN step
    in the middle, eager and compiled agree to float32 rounding, and the skipped step changed nothing."""
    torch.manual_seed(0)
    shapes = [(64, 48), (48,), (32, 64, 3), (7,)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * (k + 1) * 2.0**14 for s in shapes] for k in range(5)]
    grads[2][0][0, 0] = math.nan

    def run(compile):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = Lamb(
            [{"params": params[::2], "weight_decay": 0.05}, {"params": params[1::2], "weight_decay": 0.0}],
            lr=0.01,
            compile=compile,
        )
        for k, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = g
            opt.step(**_amp_args(2.0**14, k == 2))
        return params, opt

    torch._dynamo.reset()
    eager, _ = run(False)
    compiled, opt = run(True)
    assert [int(g["step"]) for g in opt.param_groups] == [4, 4]
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

"""Model package: registry, state-dict compatibility, parity with the authors' formulation,
mixed-precision stability, attention paths, checkpoint loading."""
from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_data_config

import t2t_vit
from t2t_vit.checkpoint import CheckpointError, build_model, load_checkpoint, read_checkpoint
from t2t_vit.layers import SoftSplit, TokenPerformer, sinusoid_table
from t2t_vit.model import ARCHS, TEST_MODELS

from studies.authors import authors_forward, numpy_sinusoid

pytestmark = pytest.mark.timeout(300)

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "official_state_dict"
IMAGENET_MODELS = [n for n in ARCHS if n not in TEST_MODELS]
ALL_MODELS = list(ARCHS)

# Parameter counts of the authors' models (all parameters, frozen included), typed from their released
# checkpoints' state dicts (github.com/yitu-opensource/T2T-ViT).
REFERENCE_PARAMS = {
    "t2t_vit_7": 4_310_222, "t2t_vit_10": 5_889_230, "t2t_vit_12": 6_941_902, "t2t_vit_14": 21_545_550,
    "t2t_vit_19": 39_177_422, "t2t_vit_24": 64_105_934, "t2t_vit_t_14": 21_541_070, "t2t_vit_t_19": 39_172_942,
    "t2t_vit_t_24": 64_101_454, "t2t_vit_14_resnext": 21_545_550, "t2t_vit_14_wide": 25_156_302,
}


def _reference_json(name: str) -> dict:
    path = REFERENCE_DIR / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"reference state-dict listing not found at {path}")
    return json.loads(path.read_text())


def _randomize(model: torch.nn.Module, seed: int = 0, logit_scale: float = 3.0) -> torch.nn.Module:
    """Weights with realistic scales (so logits are O(1..10), not ~0 as at init); frozen ones kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        model.head.weight.mul_(logit_scale)
    return model


def _arch(name):
    return ARCHS[name]["num_heads"], ARCHS[name]["tokens_type"]


# --------------------------------------------------------------------------------------- registry


def test_every_variant_is_registered_in_timm():
    assert set(IMAGENET_MODELS) == set(REFERENCE_PARAMS)
    listed = set(timm.list_models("t2t_vit*"))
    assert set(ALL_MODELS) <= listed


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_state_dict_matches_authors_release(name):
    ref = _reference_json(name)
    model = timm.create_model(name)
    sd = model.state_dict()
    assert [k for k, _ in ref["state_dict"]] == list(sd), "keys (and their order) must equal the release"
    for key, shape in ref["state_dict"]:
        assert tuple(sd[key].shape) == tuple(shape), key
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_total == ref["num_params_total"] == REFERENCE_PARAMS[name]
    assert n_train == ref["num_params_trainable"]
    frozen = {n: list(p.shape) for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == ref["frozen_params"]


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14", "t2t_vit_14"])
def test_pretrained_cfg_and_data_config(name):
    model = timm.create_model(name, num_classes=10, img_size=384, drop_path_rate=0.1)
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 384, 384)
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert model.pretrained_cfg["classifier"] == "head" and model.head.out_features == 10
    assert model.pos_embed.shape == (1, (384 // 16) ** 2 + 1, model.embed_dim)
    # drop_path linearly from 0 to the rate over depth
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)


def test_384_checkpoint_config_tag():
    model = timm.create_model("t2t_vit_14.in1k_384")
    assert model.img_size == 384 and resolve_data_config(model=model)["input_size"] == (3, 384, 384)


@pytest.mark.parametrize("img_size", [0, 100, 225])
def test_img_size_must_be_multiple_of_16(img_size):
    with pytest.raises(ValueError, match="multiple of 16"):
        timm.create_model("t2t_vit_test", img_size=img_size)


def test_sinusoid_table_matches_numpy_formula():
    for n, d in [(197, 256), (577, 384), (17, 64)]:
        torch.testing.assert_close(sinusoid_table(n, d), numpy_sinusoid(n, d), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- forward / backward shapes


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_every_variant(name):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, num_classes=7, drop_path_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"no gradient reaches {n}"
        else:
            assert p.grad is None, f"frozen {n} received a gradient"
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    expected = ["pos_embed"] + ([f"tokens_to_token.attention{i}.w" for i in (1, 2)]
                                if ARCHS[name]["tokens_type"] == "performer" else [])
    assert frozen == sorted(expected)


def test_frozen_params_not_in_optimizer():
    model = timm.create_model("t2t_vit_test")
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.pos_embed) not in in_opt
    assert id(model.tokens_to_token.attention1.w) not in in_opt
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.cls_token) in no_decay and id(model.blocks[0].norm1.bias) in no_decay
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay


# --------------------------------------------------------------- parity with the authors' formulation


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_logits_match_authors_formulation(name, fused):
    model = _randomize(timm.create_model(name, img_size=48)).eval()
    model.set_fused_attn(fused)
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        ref = authors_forward(model.state_dict(), x, *_arch(name))
    assert ref.abs().max() > 1.0, "logits must have a real scale for the tolerance to mean something"
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_logits_match_authors_formulation_224(name):
    model = _randomize(timm.create_model(name)).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x)
        ref = authors_forward(model.state_dict(), x, *_arch(name))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_performer_gradients_match_authors_formulation():
    """The detached max-shift changes no gradient: compare in float64 against the literal formula."""
    torch.manual_seed(0)
    mod = TokenPerformer(dim=147, in_dim=64).double().eval()
    _randomize_module(mod)
    x1 = torch.randn(2, 50, 147, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    from studies.authors import _performer

    sd = {f"p.{k}": v for k, v in mod.state_dict().items()}
    for n, v in mod.named_parameters():
        sd[f"p.{n}"] = v  # share the Parameter objects so gradients land on them
    y_ours = mod(x1)
    y_ref = _performer(x2, sd, "p")
    torch.testing.assert_close(y_ours, y_ref, atol=1e-10, rtol=1e-9)
    g = torch.randn_like(y_ours)
    gx1, gw1 = torch.autograd.grad(y_ours, (x1, mod.kqv.weight), g)
    gx2, gw2 = torch.autograd.grad(y_ref, (x2, mod.kqv.weight), g)
    torch.testing.assert_close(gx1, gx2, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(gw1, gw2, atol=1e-9, rtol=1e-7)


def _randomize_module(mod):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mod.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p.shape[-1]))


def test_sdpa_path_equals_explicit_path():
    model = _randomize(timm.create_model("t2t_vit_t_14", img_size=64)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.set_fused_attn(True)
        a = model(x)
        model.set_fused_attn(False)
        b = model(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14", "t2t_vit_14_resnext"])
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_cls_only_last_block_gives_the_authors_logits(name, fused):
    model = _randomize(timm.create_model(name, img_size=48)).eval()
    model.set_fused_attn(fused)
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x)
        model.set_cls_only_last_block()
        cls = model(x)
        features = model.forward_features(x)
        ref = authors_forward(model.state_dict(), x, *_arch(name))
        model.set_cls_only_last_block(False)
        again = model(x)
    assert features.shape == (3, 1, model.embed_dim)
    torch.testing.assert_close(cls, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(cls, full, atol=1e-5, rtol=0)
    assert torch.equal(again, full)  # switched off: the whole last block again


def test_cls_only_last_block_skips_the_query_side_work_of_the_other_tokens():
    """Counted by PyTorch, checked against the arithmetic: for N tokens of width C (MLP hidden width M) the
    last block stops computing N - 1 rows of the q projection, q.k^T and attn.v (N*C each), proj and the
    MLP. Explicit attention, whose MatMuls the counter sees."""
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model("t2t_vit_14", img_size=64).eval()
    model.set_fused_attn(False)
    x = torch.randn(1, 3, 64, 64)

    def flops():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        return counter.get_total_flops()

    full = flops()
    model.set_cls_only_last_block()
    cls = flops()
    n, c = model.pos_embed.shape[1], model.embed_dim
    m = model.blocks[-1].mlp.fc1.out_features
    assert full - cls == 2 * (n - 1) * (c * c + 2 * n * c + c * c + 2 * c * m)


@pytest.mark.parametrize("in_chans,k,s,p,size", [(3, 7, 4, 2, 32), (16, 3, 2, 1, 14), (64, 3, 2, 1, 8)])
def test_soft_split_conv_equals_unfold(in_chans, k, s, p, size):
    split = SoftSplit(in_chans, k, s, p)
    x = torch.randn(2, in_chans, size, size)
    ref = torch.nn.functional.unfold(x, k, stride=s, padding=p).transpose(1, 2)  # independent call
    split.impl = "grouped"
    torch.testing.assert_close(split(x), ref, atol=0, rtol=0)  # a copy: exactly equal
    torch.testing.assert_close(split.half()(x.half()), ref.half(), atol=0, rtol=0)
    assert "one_hot_grouped" not in split.state_dict()
    assert split.one_hot_grouped.numel() == in_chans * k**4  # C*k^4 weights (multiply-adds per output pixel)
    with pytest.raises(ValueError, match="impl must be one of"):
        split.impl = "conv"  # the dense form is export's comparison option (export.patterns.DenseSoftSplit)


# ------------------------------------------------------------------------ mixed-precision stability


def _overflowing_model(name="t2t_vit_7", img_size=64):
    """A model whose T2T Performer keys and queries sit on the random-feature directions, so the
    authors' exp(w.x - |x|^2/2) reaches exp(16)/sqrt(32) = 1.6e6 > fp16 max (65504)."""
    model = _randomize(timm.create_model(name, img_size=img_size), seed=4).eval()
    perf = model.tokens_to_token.attention1
    with torch.no_grad():
        emb = perf.emb
        perf.kqv.weight[: 2 * emb].mul_(0.05)
        perf.kqv.bias[:emb] = perf.w[0]  # k
        perf.kqv.bias[emb: 2 * emb] = perf.w[0]  # q
    return model


@pytest.mark.parametrize("fp32_core", [True, False], ids=["fp32-core", "all-fp16"])
def test_authors_formulation_overflows_in_fp16_ours_does_not(fp32_core):
    model = _overflowing_model()
    model.set_performer_fp32_core(fp32_core)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref32 = authors_forward(model.state_dict(), x, *_arch("t2t_vit_7"))
        ref16 = authors_forward(model.state_dict(), x.half(), *_arch("t2t_vit_7"))
        ours32 = model(x)
        ours16 = model.half()(x.half()).float()
    assert torch.isfinite(ref32).all()
    assert not torch.isfinite(ref16).all(), "the authors' formulation should overflow here in fp16"
    torch.testing.assert_close(ours32, ref32, atol=1e-4, rtol=0)
    assert torch.isfinite(ours16).all()
    # fp16 carries ~3 significant digits through 7 blocks: stated tolerance 2% of the logit range
    err = (ours16 - ref32).abs().max().item()
    assert err <= 0.02 * ref32.abs().max().item(), err
    assert (ours16.argmax(1) == ref32.argmax(1)).all()


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models_run_every_variant(name, dtype):
    model = timm.create_model(name, img_size=32).eval().to(dtype)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_autocast_forward_backward_finite():
    model = _overflowing_model("t2t_vit_test", img_size=64).train()
    x = torch.randn(4, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------ checkpoint loading


@pytest.fixture
def trained_like():
    return _randomize(timm.create_model("t2t_vit_7"), seed=7).eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_authors_training_checkpoint_loads_with_timm_and_ours(tmp_path, trained_like):
    # The layout of the authors' timm CheckpointSaver files, including an argparse Namespace.
    noise = {k: v + 1 for k, v in trained_like.state_dict().items()}
    ckpt = {
        "epoch": 309, "arch": "t2t_vit_7", "state_dict": noise, "optimizer": {"state": {}, "param_groups": []},
        "args": argparse.Namespace(model="t2t_vit_7", lr=1e-3, amp=False), "version": 2,
        "state_dict_ema": trained_like.state_dict(),
    }
    path = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    torch.save(ckpt, path)
    m1 = timm.create_model("t2t_vit_7", checkpoint_path=str(path))  # timm's own loader, EMA preferred
    assert _same_weights(m1, trained_like)
    m2 = build_model("t2t_vit_7", path)
    assert _same_weights(m2, trained_like)
    m3 = build_model("t2t_vit_7", path, weights="model")
    assert torch.equal(m3.head.weight, noise["head.weight"])


def test_cifar_checkpoint_with_module_prefix(tmp_path):
    src = _randomize(timm.create_model("t2t_vit_test", num_classes=10), seed=8)
    path = tmp_path / "cifar.pth"
    torch.save({"net": {"module." + k: v for k, v in src.state_dict().items()}, "acc": 97.0, "epoch": 60}, path)
    model = build_model("t2t_vit_test", path)
    assert model.num_classes == 10 and _same_weights(model, src)


def test_safetensors_and_bare_state_dict(tmp_path, trained_like):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in trained_like.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save(trained_like.state_dict(), tmp_path / "w.pth")
    assert _same_weights(build_model("t2t_vit_7", tmp_path / "w.safetensors"), trained_like)
    assert _same_weights(build_model("t2t_vit_7", tmp_path / "w.pth"), trained_like)


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "hook": functools.partial(print, "pwned")}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_checkpoint(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(CheckpointError):
        read_checkpoint(bad)


def test_wrong_model_error_lists_problems_and_suggests(tmp_path):
    src = timm.create_model("t2t_vit_10")
    torch.save({"state_dict_ema": src.state_dict()}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError) as e:
        build_model("t2t_vit_7", tmp_path / "c.pth")
    msg = str(e.value)
    assert "unexpected keys (33)" in msg and "blocks.7.attn.qkv.weight" in msg  # 3 extra blocks x 11 tensors
    assert "these weights fit: t2t_vit_10" in msg
    src14 = timm.create_model("t2t_vit_t_14")
    torch.save(src14.state_dict(), tmp_path / "t.pth")
    with pytest.raises(CheckpointError) as e:
        build_model("t2t_vit_14", tmp_path / "t.pth")
    msg = str(e.value)
    assert "missing keys" in msg and "tokens_to_token.attention1.w" in msg
    assert "t2t_vit_t_14" in msg


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 't2t_vit_99'.*t2t_vit_7"):
        build_model("t2t_vit_99")


def test_other_num_classes_drops_head(tmp_path, trained_like):
    torch.save({"state_dict_ema": trained_like.state_dict()}, tmp_path / "c.pth")
    model = timm.create_model("t2t_vit_7", num_classes=10)
    head_before = model.head.weight.clone()
    report = load_checkpoint(model, tmp_path / "c.pth")
    assert report["dropped_head"] and torch.equal(model.head.weight, head_before)
    assert torch.equal(model.blocks[3].mlp.fc1.weight, trained_like.blocks[3].mlp.fc1.weight)


def test_other_img_size_rebuilds_pos_embed_analytically(tmp_path, trained_like):
    torch.save({"state_dict_ema": trained_like.state_dict()}, tmp_path / "c.pth")
    model = build_model("t2t_vit_7", tmp_path / "c.pth", img_size=384)
    torch.testing.assert_close(model.pos_embed.data, numpy_sinusoid(577, 256), atol=1e-6, rtol=0)
    assert torch.equal(model.cls_token, trained_like.cls_token)
    out = model.eval()(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_model_package_has_no_gpu_or_deployment_imports():
    import subprocess
    import sys

    code = ("import sys, t2t_vit, t2t_vit.checkpoint, t2t_vit.data; "
            "bad = [m for m in ('tensorrt', 'onnxruntime', 'pycuda', 'polygraphy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    assert t2t_vit.__version__


def test_trained_like_sets_every_bias_and_layernorm_affine_from_the_seed():
    from t2t_vit.checkpoint import trained_like_

    def state(seed):
        torch.manual_seed(0)
        return trained_like_(timm.create_model("t2t_vit_test", img_size=32), seed=seed).state_dict()

    torch.manual_seed(0)
    fresh = timm.create_model("t2t_vit_test", img_size=32).state_dict()
    a, b, other = state(0), state(0), state(1)
    changed = {k for k in fresh if not torch.equal(fresh[k], a[k])}
    linears_norms = {k for k in fresh if k.endswith(".bias") or ("norm" in k and k.endswith(".weight"))}
    assert changed == linears_norms  # biases, norm scales and shifts: all of them, and nothing else
    for k in changed:
        assert torch.equal(a[k], b[k]) and not torch.equal(a[k], other[k])
        if k.endswith(".bias"):
            assert a[k].abs().min() > 0
        else:
            assert (a[k] - 1).abs().max() > 0.05

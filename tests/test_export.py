"""ONNX export: graph patterns, precision typing, validation on ONNX Runtime, metadata, clear errors.

Reference numbers are always the PyTorch model's own forward pass; pattern counts are checked against
the model's modules (an independent count), never against numbers the exporter produced.
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import t2t_vit  # noqa: F401  (registers the models)
from export import patterns as P
from export import to_onnx
from export import validate as V
from export.settings import METADATA_KEY
from export.to_onnx import ExportError, ExportSettings, export_onnx
from t2t_vit.graphs import GraphError, fp32_tensors, ort_session, read_metadata, value_types
from t2t_vit.data import DataConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FORBIDDEN = ("Einsum", "GatherND", "ScatterND", "Col2Im", "Im2Col")


def _census(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _n_layernorm(model: nn.Module) -> int:
    return sum(type(m) is nn.LayerNorm for m in model.modules())


def _n_softmax_attention(model: nn.Module) -> int:
    # Backbone blocks always use softmax attention; the token transformer adds 2 in the T2T stage.
    return len(model.blocks) + (2 if model.tokens_type == "transformer" else 0)


def _images(model: nn.Module, shared_data: Path | None, n: int) -> torch.Tensor:
    if shared_data is None:
        return torch.randn(n, 3, model.img_size, model.img_size, generator=torch.Generator().manual_seed(0))
    images, _, _ = V.validation_images(model, shared_data / "imagenette2" / "val", n)
    return images


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    return V.ort_logits(ort_session(path), x)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """t2t_vit_test at 64 px (10 classes, random weights) exported in both precisions."""
    torch.manual_seed(0)
    model = timm.create_model("t2t_vit_test", num_classes=10, img_size=64).eval()
    out = tmp_path_factory.mktemp("tiny")
    graphs = to_onnx.export_model(model, out)
    return model, Path(graphs["fp32"]["path"]), Path(graphs["fp16"]["path"]), graphs


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_patterns(tiny, precision):
    model = tiny[0]
    path = tiny[1] if precision == "fp32" else tiny[2]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    census = Counter(n.op_type for n in proto.graph.node)
    assert not {op: census[op] for op in FORBIDDEN if census[op]}
    assert census["LayerNormalization"] == _n_layernorm(model)
    assert census["Softmax"] == _n_softmax_attention(model)
    assert census["Conv"] == 3  # one per soft split, no Unfold decomposition
    assert census["Gather"] <= 2  # cls-token select (and the batch size read for its Expand), no chains
    assert census["Pad"] == 0  # Unfold's explicit padding is absent: the Conv pads
    chains = P.attention_chains(proto)
    assert len(chains) == _n_softmax_attention(model)
    for c in chains:
        assert c["qk_matmul"] and c["av_matmul"] and c["q_scaled_first"], c
    rank = {vi.name: len(vi.type.tensor_type.shape.dim)
            for vi in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    assert all(rank[c["qk_output"]] == 4 for c in chains)  # [B, heads, tokens, tokens]
    for n in proto.graph.node:
        if n.op_type == "Softmax":
            assert next((a.i for a in n.attribute if a.name == "axis"), -1) in (-1, 3)


def test_plain_export_fails_the_pattern_check(tiny, tmp_path):
    """Without the swaps, Unfold exports as Pad + Gather chains: the checks must notice."""
    model = tiny[0]
    path = export_onnx(model, tmp_path / "plain.onnx", settings=ExportSettings(patterns=False))
    census = _census(path)
    assert census["Conv"] == 0 and census["Gather"] > 2
    with pytest.raises(P.PatternError, match="Conv nodes"):
        P.check_patterns(onnx.load(str(path)), model)
    # The plain graph computes the same function (it is the benchmark baseline).
    x = torch.randn(3, 3, 64, 64)
    np.testing.assert_allclose(_ort(path, x), V.torch_logits(model, x), atol=1e-4)


def test_caller_model_untouched(tiny):
    model = tiny[0]
    from t2t_vit.layers import SoftSplit

    assert all(m.impl == "unfold" for m in model.modules() if isinstance(m, SoftSplit))
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("in_chans,k,s,p,size", [(3, 7, 4, 2, 32), (16, 3, 2, 1, 14), (64, 3, 2, 1, 8)])
def test_dense_soft_split_equals_unfold(in_chans, k, s, p, size):
    """``--soft-split conv``'s form (export's comparison option): the same copy as Unfold, C^2*k^4 weights."""
    from export.patterns import DenseSoftSplit
    from t2t_vit.layers import SoftSplit

    dense = DenseSoftSplit(SoftSplit(in_chans, k, s, p))
    x = torch.randn(2, in_chans, size, size)
    ref = torch.nn.functional.unfold(x, k, stride=s, padding=p).transpose(1, 2)  # independent call
    torch.testing.assert_close(dense(x), ref, atol=0, rtol=0)  # a copy: exactly equal
    torch.testing.assert_close(dense.half()(x.half()), ref.half(), atol=0, rtol=0)
    assert dense.one_hot.numel() == in_chans**2 * k**4 and not dense.state_dict()


def test_soft_split_forms_swap_in_place_and_back():
    """soft_split_as_conv: "conv" swaps in DenseSoftSplit (a half model's kernels stay half), "grouped" swaps it
    back; the state dict and the logits never change."""
    from export.patterns import DenseSoftSplit, soft_split_as_conv
    from t2t_vit.layers import SoftSplit

    torch.manual_seed(0)
    model = timm.create_model("t2t_vit_test").eval()
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    plain_half = copy.deepcopy(model).half()
    with torch.no_grad():
        ref = model(x)
        soft_split_as_conv(model, "conv")
        splits = [m for m in model.modules() if isinstance(m, SoftSplit)]
        assert len(splits) == 3 and all(type(m) is DenseSoftSplit for m in splits)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        assert set(model.state_dict()) == keys
        half = soft_split_as_conv(plain_half, "conv")
        assert all(m.one_hot.dtype == torch.float16 for m in half.modules() if isinstance(m, DenseSoftSplit))
        soft_split_as_conv(model, "grouped")
        splits = [m for m in model.modules() if isinstance(m, SoftSplit)]
        assert all(type(m) is SoftSplit and m.impl == "grouped" for m in splits)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_default_fp16_graph_keeps_layernorms_fp32(tiny):
    """The default (DEFAULT_LAYERNORM = fp32): every LayerNormalization reads and writes float32 behind Casts,
    and the metadata says so; everything else outside the Performer cores is fp16."""
    proto = onnx.load(str(tiny[2]))
    types = value_types(proto)
    lns = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert len(lns) == _n_layernorm(tiny[0])
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT and types[n.output[0]] == onnx.TensorProto.FLOAT for n in lns)
    assert read_metadata(tiny[2])["layernorm_precision"] == "fp32"


def test_fp16_graph_is_fp16_inside_fp32_at_io(tiny, tmp_path):
    # The fp16-LayerNorm form (--layernorm-precision fp16): fp32 only at the I/O and in the Performer cores.
    proto = onnx.load(str(export_onnx(tiny[0], tmp_path / "ln16.onnx", precision="fp16",
                                 settings=ExportSettings(layernorm="fp16"))))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert proto.graph.input[0].type.tensor_type.elem_type == f32
    assert proto.graph.output[0].type.tensor_type.elem_type == f32
    # Every weight matrix is fp16 except the Performers' frozen projection w (used by the fp32 core).
    w_shape = list(tiny[0].tokens_to_token.attention1.w.shape)
    mats = [i for i in proto.graph.initializer if i.data_type in (f32, f16) and len(i.dims) == 2]
    assert mats and all(i.data_type == f16 or list(i.dims) in (w_shape, w_shape[::-1]) for i in mats)
    assert sum(i.data_type == f32 for i in mats) == 2
    # fp32 exists only inside the two Performer cores, entered and left through explicit Casts.
    kept32 = fp32_tensors(proto)
    assert kept32 and all("/attention1/" in t["tensor"] or "/attention2/" in t["tensor"]
                          for t in kept32 if t["producer"] != "initializer")
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    assert {casts[0].input[0], casts[-1].output[0]} == {"input", "logits"}
    assert len(casts) == 2 + 2 * 4  # I/O + per Performer: k, q, v in, y out
    kept = tiny[3]["fp16"]["fp32_tensors"]
    assert {"graph input", "graph output"} <= {k["producer"] for k in kept}
    assert all(k["reason"] for k in kept)
    # Without the island the graph is fp16 throughout.
    pure = onnx.load(str(export_onnx(tiny[0], tmp_path / "pure.onnx", precision="fp16",
                                     settings=ExportSettings(fp32_core=False, layernorm="fp16"))))
    assert fp32_tensors(pure) == [] and sum(n.op_type == "Cast" for n in pure.graph.node) == 2
    # --fp16-io: no boundary Casts, fp16 in and out.
    io16 = export_onnx(tiny[0], tmp_path / "io16.onnx", precision="fp16", settings=ExportSettings(fp16_io=True))
    p16 = onnx.load(str(io16))
    assert p16.graph.input[0].type.tensor_type.elem_type == f16
    assert p16.graph.output[0].type.tensor_type.elem_type == f16
    assert not any(n.op_type == "Cast" and n.input[0] == "input" for n in p16.graph.node)
    x = torch.randn(2, 3, 64, 64)
    assert ort_session(io16).run(None, {"input": x.numpy().astype(np.float16)})[0].dtype == np.float16


def test_validation_on_real_images(tiny, shared_data):
    model = tiny[0]
    images, labels, source = V.validation_images(model, shared_data / "imagenette2" / "val", 40)
    assert images.shape == (40, 3, 64, 64) and "class-balanced" in source
    ref = V.torch_logits(model, images)
    l32, l16 = _ort(tiny[1], images), _ort(tiny[2], images)
    assert np.abs(l32 - ref).max() <= V.FP32_MAX_ABS_DLOGIT
    assert np.isfinite(l16).all()
    # fp16 stays within fp16 resolution of the logit scale, and top-1 agrees except on near-ties.
    scale = np.abs(ref).max()
    assert np.abs(l16 - l32).max() <= 1e-2 * scale
    top2 = np.sort(l32, 1)[:, -2:]
    flips = l16.argmax(1) != l32.argmax(1)
    assert (top2[flips, 1] - top2[flips, 0] <= 2 * np.abs(l16 - l32).max()).all()
    report = V.validate_graphs(model, tiny[1], tiny[2], images, labels, source=source)
    assert report["comparisons"][0]["max_abs_dlogit"] == pytest.approx(np.abs(l32.astype(np.float64) - ref).max())


@pytest.mark.parametrize("name", ["t2t_vit_test", "t2t_vit_t_test"])
def test_cls_only_last_block_graphs_equal_the_whole_model(name, tmp_path, shared_data):
    """--cls-only-last-block: the fp32 graph gives the PyTorch model's logits (every block whole) on real
    images, the fp16 graph those of the default fp16 graph, with every TensorRT pattern still in place."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, img_size=64).eval()
    graphs = {(prec, cls): export_onnx(model, tmp_path / f"{prec}-{cls}.onnx", prec,
                                       settings=ExportSettings(cls_only_last_block=cls))
              for prec in ("fp32", "fp16") for cls in (False, True)}
    assert model.blocks[-1].query_tokens is None  # the caller's model keeps every block whole
    assert read_metadata(graphs["fp32", True])["last_block"] == "cls-only"
    assert read_metadata(graphs["fp32", False])["last_block"] == "all-tokens"
    images = _images(model, shared_data, 24)
    ref = V.torch_logits(model, images)
    assert np.abs(_ort(graphs["fp32", True], images) - ref).max() <= V.FP32_MAX_ABS_DLOGIT
    l16, l16_cls = _ort(graphs["fp16", False], images), _ort(graphs["fp16", True], images)
    assert np.abs(l16_cls - l16).max() <= 1e-2 * np.abs(ref).max()
    for prec in ("fp32", "fp16"):
        proto = onnx.load(str(graphs[prec, True]))
        chains = P.attention_chains(proto)
        assert len(chains) == _n_softmax_attention(model)
        assert all(c["qk_matmul"] and c["q_scaled_first"] and c["av_matmul"] for c in chains)
        assert _census(graphs[prec, True])["LayerNormalization"] == _n_layernorm(model)
        # The last attention has one query row: its Softmax reads (batch, heads, 1, tokens).
        inferred = onnx.shape_inference.infer_shapes(proto)
        shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                  for v in inferred.graph.value_info}
        last = [n for n in proto.graph.node if n.op_type == "Softmax"][-1]
        assert shapes[last.input[0]][2:] == [1, model.pos_embed.shape[1]]


def test_fp32_performer_core_keeps_fp32_arithmetic():
    """In float32 the swapped Performer is the model's own arithmetic, bit for bit."""
    torch.manual_seed(0)
    model = timm.create_model("t2t_vit_test", num_classes=10, img_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = P.apply_export_patterns(model)(x)
        got = P.performer_core_fp32(P.apply_export_patterns(model))(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_fp32_performer_core_is_needed_on_trained_weights(shared_data, reference_checkpoint):
    """Random init never reaches the regime, a trained Performer does: pure fp16 drifts from fp32
    (exponent cancellation, D underflow, epsilon overflow) and the fp32 core brings it back."""
    from t2t_vit.checkpoint import build_model

    model = build_model("t2t_vit_7", reference_checkpoint).eval()
    x, _, _ = V.validation_images(model, shared_data / "imagenette2" / "val", 32)
    with torch.no_grad():
        want = P.apply_export_patterns(model)(x)
        pure = P.performer_core_fp32(P.apply_export_patterns(model).half(), enable=False)(x.half()).float()
        core = P.performer_core_fp32(P.apply_export_patterns(model).half())(x.half()).float()

    def rel(a):
        return ((a - want).norm() / want.norm()).item()

    assert rel(core) < 0.02 and rel(pure) > 3 * rel(core)


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch(tiny, batch):
    x = torch.randn(batch, 3, 64, 64)
    ref = V.torch_logits(tiny[0], x)
    np.testing.assert_allclose(_ort(tiny[1], x), ref, atol=V.FP32_MAX_ABS_DLOGIT, rtol=0)
    assert _ort(tiny[2], x).shape == ref.shape


def test_metadata_round_trip(tiny):
    model = tiny[0]
    for path, precision in ((tiny[1], "fp32"), (tiny[2], "fp16")):
        meta = read_metadata(path)
        assert all(isinstance(v, str) for v in meta.values())
        assert meta["precision"] == precision and meta["model"] == "t2t_vit_test"
        assert meta["num_classes"] == "10"
        assert {"checkpoint_sha256", "project_version"} <= set(meta)
        assert DataConfig.from_metadata(meta) == DataConfig.from_model(model)
    assert read_metadata(tiny[1])["img_size"] == "64"


def test_caller_metadata_overrides_defaults(tiny, tmp_path):
    path = export_onnx(tiny[0], tmp_path / "m.onnx", metadata={"checkpoint_sha256": "abc", "extra": 3})
    meta = read_metadata(path)
    assert meta["checkpoint_sha256"] == "abc" and meta["extra"] == "3" and meta["precision"] == "fp32"


def test_settings_round_trip_through_the_metadata(tiny, tmp_path):
    """One recipe object, one metadata key: what export_onnx was given is what a later stage reads back, for
    both graphs of an export (the fp16-only fields are recorded in the fp32 graph too, and leave it fp32)."""
    assert ExportSettings.from_metadata(read_metadata(tiny[1])) == ExportSettings()  # make onnx's defaults
    assert ExportSettings.from_metadata(read_metadata(tiny[2])) == ExportSettings()
    recipe = ExportSettings(soft_split="conv", cls_only_last_block=True, fp32_core=False, layernorm="fp16",
                            fp16_io=True)
    path = export_onnx(tiny[0], tmp_path / "m.onnx", "fp32", settings=recipe)
    meta = read_metadata(path)
    assert ExportSettings.from_metadata(meta) == recipe
    assert json.loads(meta[METADATA_KEY])["layernorm"] == "fp16"  # plain JSON, readable without the project
    # The readable keys agree with the recipe; the graph itself stays fp32 with float32 I/O.
    assert (meta["soft_split"], meta["last_block"], meta["precision"], meta["io_dtype"]) == \
        ("conv", "cls-only", "fp32", "float32")
    # A recipe from a newer export with a field this version lacks is refused, not half-applied; a field it
    # lacks takes its default (the behaviour before the field existed).
    newer = {METADATA_KEY: json.dumps({**json.loads(meta[METADATA_KEY]), "fp8": True})}
    with pytest.raises(ExportError, match=r"unknown fields \['fp8'\].*make onnx"):
        ExportSettings.from_metadata(newer)
    assert ExportSettings.from_metadata({METADATA_KEY: '{"opset": 19}'}) == ExportSettings(opset=19)
    with pytest.raises(ExportError, match="--layernorm-precision"):
        ExportSettings.from_metadata({METADATA_KEY: '{"layernorm": "bf16"}'})


def test_graph_without_recipe_is_refused_in_one_line():
    """A graph exported before the recipe was recorded: one line that names the key and `make onnx`."""
    with pytest.raises(ExportError) as e:
        ExportSettings.from_metadata({"model": "t2t_vit_7"}, source="old.fp32.onnx")
    assert "\n" not in str(e.value) and "old.fp32.onnx" in str(e.value) and METADATA_KEY in str(e.value)
    assert "`make onnx`" in str(e.value)


def test_remove_reduction_upcasts_on_a_small_graph():
    """Cast(fp32) -> ReduceSum -> Cast(fp16) becomes one fp16 ReduceSum with the same numbers."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["x32", "axes"], ["s32"], keepdims=1),
        helper.make_node("Cast", ["s32"], ["s16"], to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["s16", "s16"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = (np.arange(16, dtype=np.float16).reshape(2, 8) / 8).astype(np.float16)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    model, rewired = P.remove_reduction_upcasts(model)
    assert len(rewired) == 1 and [n.op_type for n in model.graph.node] == ["ReduceSum", "Mul"]
    onnx.checker.check_model(model, full_check=True)
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(after[:, 0], (x.astype(np.float64).sum(1)) ** 2, rtol=1e-3)


@pytest.mark.parametrize("name", t2t_vit.list_t2t_models())
def test_every_variant_exports_and_validates(name, tmp_path, request):
    """Every registered variant at 32 px, both precisions, on real images when present.

    onnxslim's time grows with the weight bytes (it re-serializes the model for every shape inference),
    so the four 39M-64M-parameter variants skip it here to keep the file inside its time budget; the
    swaps, opset and checks they test do not depend on it, and simplification itself is tested on the
    other variants.
    """
    shared = request.getfixturevalue("shared_data") if _has_data() else None
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, img_size=32).eval()
    simplify = sum(p.numel() for p in model.parameters()) < 30e6
    x = _images(model, shared, 4)
    ref = V.torch_logits(model, x)
    for precision in ("fp32", "fp16"):
        path = export_onnx(model, tmp_path / f"{name}.{precision}.onnx", precision=precision,
                           settings=ExportSettings(simplify=simplify))
        census = _census(path)
        assert not {op: census[op] for op in FORBIDDEN if census[op]}
        assert census["LayerNormalization"] == _n_layernorm(model)
        assert census["Softmax"] == _n_softmax_attention(model)
        logits = _ort(path, x)
        assert np.isfinite(logits).all()
        if precision == "fp32":
            assert np.abs(logits - ref).max() <= V.FP32_MAX_ABS_DLOGIT
        else:
            assert np.abs(logits - ref).max() <= 2e-2 * max(np.abs(ref).max(), 1e-2)


def _has_data() -> bool:
    from tests.conftest import IMAGENETTE

    return (IMAGENETTE / "val").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_full_size_export_validates(name, tmp_path, shared_data):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    assert model.img_size == 224
    graphs = to_onnx.export_model(model, tmp_path)
    images, labels, source = V.validation_images(model, shared_data / "imagenette2" / "val", 16)
    report = V.validate_graphs(model, graphs["fp32"]["path"], graphs["fp16"]["path"], images, labels,
                               batch_size=8, source=source)
    c32, c16 = report["comparisons"][:2]
    assert c32["max_abs_dlogit"] <= V.FP32_MAX_ABS_DLOGIT
    assert c16["nonfinite_images"] == 0 and c16["max_abs_dlogit"] <= 2e-2 * report["logit_scale"]
    census = _census(Path(graphs["fp32"]["path"]))
    assert census["LayerNormalization"] == _n_layernorm(model) and census["Einsum"] == 0


@pytest.mark.slow
def test_dynamo_exporter_fp16_has_no_fp32_islands(tiny, tmp_path):
    """The dynamo path wraps reductions in fp32 Casts; the rewrite removes them, numbers unchanged."""
    model = tiny[0]
    path = export_onnx(model, tmp_path / "dyn16.onnx", precision="fp16",
                       settings=ExportSettings(exporter="dynamo", fp32_core=False, layernorm="fp16"))
    proto = onnx.load(str(path))
    census = _census(path)
    assert census["Cast"] == 2 and fp32_tensors(proto) == []
    assert census["LayerNormalization"] == _n_layernorm(model) and census["Conv"] == 3
    x = torch.randn(4, 3, 64, 64)
    np.testing.assert_allclose(_ort(path, x), _ort(tiny[2], x), atol=2e-3)
    assert read_metadata(path)["exporter"].startswith("torch.onnx.export(dynamo=True)")


# ----- command line and errors -----


def test_cli_writes_graphs_and_report(tmp_path, capsys):
    out = tmp_path / "art"
    rc = to_onnx.main(["--model", "t2t_vit_test", "--img-size", "32", "--out", str(out), "--val-images", "30"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "RANDOM weights" in err
    assert {p.name for p in out.iterdir()} == {"t2t_vit_test.fp32.onnx", "t2t_vit_test.fp16.onnx",
                                               "t2t_vit_test.export.json", "t2t_vit_test.export.md"}
    report = json.loads((out / "t2t_vit_test.export.json").read_text())
    assert report["weights"] == "random" and report["validation"]["n_images"] == 30
    # Random weights with trained-like biases: the graph keeps every bias Add a checkpoint's graph has.
    graph = onnx.load(str(out / "t2t_vit_test.fp32.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    bias_adds = [n for n in graph.node if n.op_type == "Add"
                 and any(i in inits and inits[i].ndim == 1 and np.abs(inits[i]).min() > 0 for i in n.input)]
    assert len(bias_adds) >= 3 * len(timm.create_model("t2t_vit_test").blocks)  # proj, fc1, fc2 of each block
    for prec in ("fp32", "fp16"):
        g = report["graphs"][prec]
        assert g["file_bytes"] == (out / f"t2t_vit_test.{prec}.onnx").stat().st_size
        assert g["nodes"] == len(onnx.load(str(out / f"t2t_vit_test.{prec}.onnx")).graph.node)
    assert "Op census" in (out / "t2t_vit_test.export.md").read_text()
    # The Performer island's evidence: the same fp16 graph without it, compared on the same images (no
    # threshold), and nothing but the report left of it.
    names = [c["name"] for c in report["validation"]["comparisons"]]
    assert "ORT fp16 without the fp32 island vs ORT fp32" in names
    contrast = report["validation"]["comparisons"][names.index("ORT fp16 without the fp32 island vs ORT fp32")]
    assert contrast["passed"] is None and contrast["max_abs_dlogit"] > 0
    # Each fp32 tensor of the fp16 graph carries its own reason: LayerNorm (default fp32) or the island.
    reasons = {t["tensor"]: t["reason"] for t in report["graphs"]["fp16"]["fp32_tensors"]}
    fp16 = onnx.load(str(out / "t2t_vit_test.fp16.onnx"))
    ln = next(n for n in fp16.graph.node if n.op_type == "LayerNormalization")
    assert reasons[ln.output[0]] == P.LAYERNORM_FP32_REASON
    exp = next(n for n in fp16.graph.node if n.op_type == "Exp")
    assert reasons[exp.output[0]] == P.FP32_ISLAND_REASON


def test_cli_cls_only_last_block(tmp_path, capsys):
    out = tmp_path / "art"
    rc = to_onnx.main(["--model", "t2t_vit_test", "--img-size", "32", "--out", str(out), "--val-images", "12",
                       "--cls-only-last-block"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "t2t_vit_test.export.json").read_text())
    assert report["metadata"]["last_block"] == "cls-only"
    assert read_metadata(out / "t2t_vit_test.fp16.onnx")["last_block"] == "cls-only"
    assert report["validation"]["comparisons"][0]["passed"]  # ORT fp32 (cls-only) vs PyTorch, every block whole


def test_cli_with_checkpoint_records_its_hash(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("t2t_vit_test", num_classes=10, img_size=32)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.state_dict(),
                "meta": {"model": "t2t_vit_test", "img_size": 32, "num_classes": 10,
                         "class_names": [f"c{i}" for i in range(10)], "config": {}}}, ckpt)
    out = tmp_path / "art"
    assert to_onnx.main(["--model", "t2t_vit_test", "--checkpoint", str(ckpt), "--out", str(out),
                         "--val-images", "0"]) == 0
    meta = read_metadata(out / "t2t_vit_test.fp16.onnx")
    assert meta["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["img_size"] == "32" and json.loads(meta["class_names"])[3] == "c3"
    x = torch.randn(2, 3, 32, 32)
    np.testing.assert_allclose(_ort(out / "t2t_vit_test.fp32.onnx", x), V.torch_logits(model.eval(), x), atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--model", "t2t_vit_99"], "unknown model"),
    (["--model", "t2t_vit_test", "--img-size", "40"], "multiple of 16"),
])
def test_cli_clear_errors(argv, message, tmp_path, capsys):
    assert to_onnx.main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_checkpoint_mismatch(tmp_path, capsys):
    ckpt = tmp_path / "other.pth"
    torch.save(timm.create_model("t2t_vit_test", img_size=32).state_dict(), ckpt)
    assert to_onnx.main(["--model", "t2t_vit_7", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "t2t_vit_test" in err


def test_unwritable_output_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="writable"):
        export_onnx(tiny[0], blocker / "sub" / "m.onnx")
    assert to_onnx.main(["--model", "t2t_vit_test", "--img-size", "32", "--out", str(blocker / "o")]) == 2
    assert "writable" in capsys.readouterr().err
    # A failure while writing leaves neither the target nor a temporary file.
    out = tmp_path / "out"
    out.mkdir()

    def boom(*a, **k):
        raise OSError("disk full")

    import t2t_vit.files

    monkeypatch.setattr(t2t_vit.files.os, "fsync", boom)  # fails after the bytes are written
    with pytest.raises(OSError, match="disk full"):
        export_onnx(tiny[0], out / "m.onnx")
    assert list(out.iterdir()) == []


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(ExportError, match="precision"):
        export_onnx(tiny[0], tmp_path / "m.onnx", precision="int8")
    with pytest.raises(ExportError, match="opset"):
        export_onnx(tiny[0], tmp_path / "m.onnx", settings=ExportSettings(opset=16))
    for bad in ({"exporter": "jit"}, {"soft_split": "unfold"}, {"layernorm": "bf16"}):
        with pytest.raises(ExportError, match=f"--{next(iter(bad)).replace('_', '-')}"):
            export_onnx(tiny[0], tmp_path / "m.onnx", settings=ExportSettings(**bad))
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(GraphError, match="not found"):
        read_metadata(tmp_path / "missing.onnx")


def test_trained_like_weights_keep_every_bias_in_the_graph(tmp_path):
    """A fresh init's zero biases are Adds of zeros that onnxslim drops, so a benchmark of such a model
    times a graph cheaper than any checkpoint's; with trained_like_ every bias reaches the graph."""
    from t2t_vit.checkpoint import trained_like_

    torch.manual_seed(0)
    model = timm.create_model("t2t_vit_test", num_classes=10, img_size=64).eval()
    biased = [m for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    fresh = _census(export_onnx(model, tmp_path / "fresh.onnx", "fp32"))
    trained_like_(model)
    path = export_onnx(model, tmp_path / "trained-like.onnx", "fp32")
    kept = _census(path)
    assert fresh["Add"] + len(biased) - 1 <= kept["Add"]  # every Linear's bias Add but the head's (a Gemm)
    values = [onnx.numpy_helper.to_array(i).ravel() for i in onnx.load(str(path)).graph.initializer]
    for linear in biased:
        bias = linear.bias.detach().numpy()
        assert any(v.shape == bias.shape and np.allclose(v, bias, atol=1e-7) for v in values), linear


def test_side_by_side_throughput_keeps_each_graph_its_own_times(tiny, monkeypatch):
    """bench-onnx times its graphs in interleaved rounds; each result carries the times of the graph at its
    position, and each graph's session runs on its own input."""
    from studies import bench_onnx as bench

    _, fp32, fp16, _ = tiny
    ran = {}

    def fake_interleaved(fns, **kwargs):
        ran.update({k: fn()[0].shape for k, fn in fns.items()})
        return {k: [0.01 * (i + 1)] * 5 for i, k in enumerate(fns)}  # 10, 20, 30 ms in the order given

    monkeypatch.setattr(bench, "time_interleaved", fake_interleaved)
    rows = bench.throughput_side_by_side([fp32, fp16, fp32], 2, 64, threads=1)
    assert [r["median_ms"] for r in rows] == [10.0, 20.0, 30.0]
    assert [r["images_per_s"] for r in rows] == [200.0, 100.0, pytest.approx(66.67)]
    assert all(r["batch"] == 2 and r["runs"] == 5 for r in rows)
    assert len(ran) == 3 and all(shape == (2, 10) for shape in ran.values())

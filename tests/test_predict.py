"""make predict / serving.predict: top-k through an artifact's own data config, per-file errors, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from serving import predict as P
from tests.engine_helpers import REPO, data_meta, write_onnx

WNIDS = ["n01440764", "n02102040", "n02979186"]  # tench, English springer, cassette player


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, ext) in enumerate([((90, 70), "jpg"), ((64, 120), "png"), ((100, 100), "png")]):
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        arr[..., i] = 255  # a different dominant channel per image: a different top-1 of the tiny graph
        p = folder / f"img{i}.{ext}"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _by_hand(path: Path, size: int = 64) -> np.ndarray:
    """The eval transform written out: bicubic resize of the short side to floor(size/0.9), center crop,
    normalize; then the tiny graph (channel means) and a softmax."""
    img = Image.open(path).convert("RGB")
    x = TF.resize(TF.pil_to_tensor(img), int(size / 0.9), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [size, size]).float() / 255
    x = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    logits = x.mean(dim=(1, 2)).double().numpy()
    e = np.exp(logits - logits.max())
    return e / e.sum()


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    meta = {"model": "t2t_vit_test", "precision": "fp32", "num_classes": "3", "class_names": json.dumps(WNIDS),
            **data_meta(64)}
    return write_onnx(tmp_path / "t2t_vit_test.fp32.onnx", metadata=meta)


def test_topk_matches_the_eval_transform_done_by_hand(tmp_path, artifact):
    paths = _images(tmp_path / "imgs")
    clf = P.load_classifier(artifact)
    assert clf.runner.name == "onnxruntime-cpu-fp32" and clf.data_config.img_size == 64
    preds = P.predict(clf, paths, k=5, batch_size=2)
    assert [r["path"] for r in preds.results] == [str(p) for p in paths] and not preds.errors
    for r, p in zip(preds.results, paths):
        want = _by_hand(p)
        assert len(r["top"]) == 3  # k capped at the class count
        assert [t["index"] for t in r["top"]] == list(np.argsort(-want))
        np.testing.assert_allclose([t["probability"] for t in r["top"]], np.sort(want)[::-1], atol=2e-3)
        assert r["top"][0]["class"] == WNIDS[r["top"][0]["index"]]
    assert preds.results[0]["top"][0]["label"].startswith("tench")


def test_cli_json_reports_unreadable_files_and_classifies_the_rest(tmp_path, artifact):
    paths = _images(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    missing = tmp_path / "nope.png"
    items = ",".join(map(str, [paths[0], bad, missing, tmp_path / "imgs"]))
    proc = subprocess.run([sys.executable, "-m", "serving.predict", "--artifact", str(artifact), "--images", items,
                           "--json", "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    doc = json.loads(proc.stdout)
    # img0 and broken.jpg named twice (as files and inside the folder): 7 paths, 3 unreadable.
    assert [Path(r["path"]).name for r in doc["results"]] == ["img0.jpg", "img0.jpg", "img1.png", "img2.png"]
    assert [Path(e["path"]).name for e in doc["errors"]] == ["broken.jpg", "nope.png", "broken.jpg"]
    assert {Path(e["path"]).name: e["error"] for e in doc["errors"]} == {
        "broken.jpg": "not a readable image (corrupt or not an image format)", "nope.png": "file not found"}
    assert doc["data_config"]["img_size"] == 64 and doc["backend"] == "onnxruntime-cpu-fp32"
    assert "serving.predict: error: 3 of 7 images could not be read" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_text_output_and_exit_0(tmp_path, artifact):
    paths = _images(tmp_path / "imgs")
    out = tmp_path / "preds.json"
    rc = P.main(["--artifact", str(artifact), "--images", str(paths[1]), "--top", "2", "--output", str(out),
                 "--threads", "1"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 1 and len(doc["results"][0]["top"]) == 2


@pytest.mark.parametrize("argv, needle", [
    (["--images", "x.jpg"], "artifact not found"),
    (["--images", ","], "IMAGES= (--images) is empty"),
    (["--images", "x.jpg", "--model", "t2t_vit_7"], "was exported from t2t_vit_test, not MODEL=t2t_vit_7"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, artifact, argv, needle, capsys):
    art = str(tmp_path / "missing.onnx") if needle == "artifact not found" else str(artifact)
    assert P.main(["--artifact", art, *argv, "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("serving.predict: error: ") and needle in err[-1]


def test_checkpoint_runs_pytorch_and_needs_a_model(tmp_path):
    from t2t_vit.checkpoint import build_model
    from t2t_vit.data import DataConfig

    model = build_model("t2t_vit_test").eval()
    ckpt = tmp_path / "m.pth"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    paths = _images(tmp_path / "imgs")[:1]
    with pytest.raises(P.PredictError, match="MODEL="):
        P.load_classifier(ckpt)
    clf = P.load_classifier(ckpt, "t2t_vit_test")
    assert clf.runner.name == "pytorch-cpu-fp32" and clf.kind == "checkpoint"
    preds = P.predict(clf, paths, k=5)
    cfg = DataConfig.from_model(model)
    with torch.inference_mode():
        logits = model(cfg.eval_transform()(Image.open(paths[0]).convert("RGB"))[None]).double()
    want = torch.softmax(logits, 1)[0].numpy()
    got = preds.results[0]["top"]
    assert [t["index"] for t in got] == list(np.argsort(-want)[:5])
    np.testing.assert_allclose([t["probability"] for t in got], np.sort(want)[::-1][:5], rtol=1e-4, atol=1e-6)


def test_make_predict(tmp_path, artifact):
    paths = _images(tmp_path / "imgs")
    run = lambda *v: subprocess.run(["make", "-s", "predict", *v], cwd=REPO, capture_output=True, text=True,
                                    timeout=120)
    proc = run(f"ARTIFACT={artifact}", f"IMAGES={paths[0]},{paths[2]}", "ARGS=--json --threads 1")
    assert proc.returncode == 0, proc.stderr
    assert [Path(r["path"]).name for r in json.loads(proc.stdout)["results"]] == ["img0.jpg", "img2.png"]
    proc = run(f"ARTIFACT={artifact}")
    assert proc.returncode == 2 and "set IMAGES=" in proc.stdout + proc.stderr

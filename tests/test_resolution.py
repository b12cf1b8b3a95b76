"""Fine-tuning at another resolution (issue 20): the position table fitted to the new token count, the
224 px recipe, ``make train-imagenette-224``, and an exact resume of a fine-tune.

The end-to-end path runs t2t_vit_test: trained at 32 px, fine-tuned at 48 px, interrupted and resumed.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import timm
import torch

import t2t_vit  # noqa: F401
from studies.authors import numpy_sinusoid
from t2t_vit.checkpoint import build_model, load_checkpoint, read_checkpoint
from t2t_vit.files import file_sha256
from train import report as report_mod
from train import train as train_mod
from train.config import parse_config, resolve_ema_decay

from .test_train import _make_dataset

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("data"))


def _args(data: Path, out: Path, size: int, *extra: str) -> list[str]:
    return ["--model", "t2t_vit_test", "--data", str(data), "--out", str(out), "--img-size", str(size),
            "--batch-size", "8", "--workers", "0", "--cooldown-epochs", "0", "--warmup-epochs", "1",
            "--seed", "5", "--model-ema-decay", "0.9", "--precision", "bf16", *extra]


# ------------------------------------------------------------------------------------ position table

def test_sinusoid_table_is_rebuilt_for_the_new_token_count(tmp_path):
    small = timm.create_model("t2t_vit_test", num_classes=3, img_size=32)  # 2 x 2 grid: 5 rows
    torch.save({"state_dict": small.state_dict()}, tmp_path / "c.pth")
    big = timm.create_model("t2t_vit_test", num_classes=3, img_size=48)  # 3 x 3 grid: 10 rows
    big.pos_embed.data.zero_()  # so keeping the model's own table cannot pass by accident ...
    big.pos_embed.data += numpy_sinusoid(10, 64)  # ... the independent (numpy) table for 10 rows
    report = load_checkpoint(big, tmp_path / "c.pth")
    assert report["rebuilt_pos_embed"] and not report["resampled_pos_embed"] and report["pos_embed_rows"] == [5, 10]
    torch.testing.assert_close(big.pos_embed.data, numpy_sinusoid(10, 64), atol=1e-6, rtol=0)
    # The first rows are the small model's table: row i is always the sinusoid of raster index i.
    assert torch.equal(big.pos_embed.data[:, :5], small.pos_embed.data)


def test_a_table_that_is_not_the_sinusoid_is_resampled_on_its_grid(tmp_path):
    from timm.layers import resample_abs_pos_embed

    small = timm.create_model("t2t_vit_test", num_classes=3, img_size=32)
    learned = torch.randn(1, 5, 64)
    sd = {**small.state_dict(), "pos_embed": learned}
    big = timm.create_model("t2t_vit_test", num_classes=3, img_size=48)
    report = load_checkpoint(big, {"state_dict": sd})
    assert report["resampled_pos_embed"] and not report["rebuilt_pos_embed"]
    assert torch.equal(big.pos_embed.data[:, 0], learned[:, 0])  # the class token's row is kept
    torch.testing.assert_close(big.pos_embed.data, resample_abs_pos_embed(learned, [3, 3], [2, 2]))
    # Not silently replaced by the sinusoid either.
    grid = big.pos_embed.data[0, 1:].reshape(3, 3, 64)
    assert not torch.allclose(grid, numpy_sinusoid(10, 64)[0, 1:].reshape(3, 3, 64))


def test_a_table_without_a_square_grid_is_refused(tmp_path):
    from t2t_vit.checkpoint import CheckpointError

    small = timm.create_model("t2t_vit_test", num_classes=3, img_size=32)
    sd = {**small.state_dict(), "pos_embed": torch.randn(1, 7, 64)}
    with pytest.raises(CheckpointError, match="not a class token plus a square grid"):
        load_checkpoint(timm.create_model("t2t_vit_test", num_classes=3, img_size=48), {"state_dict": sd})


# --------------------------------------------------------------------------------- fine-tune end to end

@pytest.fixture(scope="module")
def small_run(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("at32")
    assert train_mod.main(_args(dataset, out, 32, "--epochs", "1")) == 0
    return out


def test_finetune_at_another_size_then_resume_exactly(dataset, small_run, tmp_path, caplog):
    init = small_run / "best.pth"
    straight, split = tmp_path / "straight", tmp_path / "split"
    ft = ("--finetune", str(init), "--epochs", "2")
    assert train_mod.main(_args(dataset, straight, 48, *ft)) == 0
    assert train_mod.main(_args(dataset, split, 48, *ft, "--stop-after", "1")) == 0
    assert read_checkpoint(split / "last.pth")["epoch"] == 0
    assert train_mod.main(["--resume", str(split / "last.pth")]) == 0  # nothing else: all from the checkpoint

    a, b = read_checkpoint(straight / "last.pth"), read_checkpoint(split / "last.pth")
    assert a["meta"]["img_size"] == b["meta"]["img_size"] == 48 and a["epoch"] == b["epoch"] == 1
    for key in ("state_dict", "state_dict_ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resume"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    # The fine-tune started from the 32 px weights: its position table is the 48 px sinusoid, everything
    # frozen is unchanged, and the later stages build it at 48 px from the checkpoint alone.
    src = read_checkpoint(init)
    torch.testing.assert_close(a["state_dict"]["pos_embed"], numpy_sinusoid(10, 64), atol=1e-6, rtol=0)
    for k in ("tokens_to_token.attention1.w", "tokens_to_token.attention2.w"):
        assert torch.equal(a["state_dict"][k], src["state_dict"][k])
    assert "position table rebuilt for 10 rows (checkpoint: 5)" in caplog.text
    model = build_model("t2t_vit_test", straight / "best.pth")
    assert model.img_size == 48 and torch.isfinite(model.eval()(torch.randn(2, 3, 48, 48))).all()
    # Where the fine-tune started survives the resume, and the report says it.
    started = b["meta"]["config"]["sources"]
    assert started["finetune"] == str(init) and started["finetune_sha256"] == file_sha256(init)
    assert started["resume"] == str(split / "last.pth")
    assert report_mod.main(["--run", str(split), "--name", "ft", "--out", str(tmp_path / "rep")]) == 0
    assert f"Fine-tuned from `{init}` (sha256 `{file_sha256(init)}`)" in (tmp_path / "rep" / "ft.md").read_text()


# ------------------------------------------------------------------------------- the recipe and target

def test_224_recipe_parses_and_is_a_finetune():
    args, sources = parse_config(["--config", str(REPO / "train/configs/imagenette_224.yaml")])
    assert sources["config"].endswith("imagenette_224.yaml")
    assert args.model == "t2t_vit_7" and args.img_size == 224 and args.precision == "bf16"
    assert args.finetune is None  # the initial weights come from the command line (make FINETUNE=)
    assert args.cache_images >= 224 and args.mixup == 0 and args.cutmix == 0
    assert args.warmup_epochs + args.cooldown_epochs <= args.epochs // 2
    # Imagenette's 9,469 train images: the EMA decay fits the run as written (train.train would cap it).
    assert resolve_ema_decay(args.model_ema_decay, 9469 // args.batch_size * args.epochs)[1] is None


def _make_n(*extra: str) -> str:
    return subprocess.run(["make", "-n", "train-imagenette-224", *extra], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


def test_make_target_finetunes_then_resumes(tmp_path):
    run = tmp_path / "run224"
    first = _make_n(f"REF224_RUN={run}", "FINETUNE=some/best.pth")
    assert "--config train/configs/imagenette_224.yaml --finetune some/best.pth" in first
    assert "--resume" not in first and "--name train-imagenette-224" in first
    run.mkdir()
    (run / "last.pth").write_bytes(b"")
    again = _make_n(f"REF224_RUN={run}", "FINETUNE=some/best.pth")
    assert f"--resume {run}/last.pth" in again and "--finetune" not in again


def test_make_target_without_the_80px_checkpoint_says_how_to_fix(tmp_path):
    res = subprocess.run(["make", "--no-print-directory", "train-imagenette-224", f"REF224_RUN={tmp_path}/none", "FINETUNE=/nonexistent.pth"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stdout.strip() == ("train-imagenette-224: error: FINETUNE=/nonexistent.pth does not exist; run make "
                                  "train-imagenette-cpu first, or pass FINETUNE=/path/to/80px/best.pth")

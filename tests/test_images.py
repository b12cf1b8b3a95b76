"""Every stage's image loader (t2t_vit.data.load_image): high-bit-depth and other Pillow modes become 8-bit
RGB by scaling, never by clipping; images without a faithful RGB form and decompression bombs are skipped
with the reason, never fatal (issue 24, items 3 and 4). Expected pixels are computed here with numpy from
the arrays the files were written from, not with the loader's code."""
from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2t_vit.data import DataConfig, ImageBatcher, Sample, load_image

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def _rgb(path: Path) -> np.ndarray:
    img = load_image(str(path))
    assert img is not None and img.mode == "RGB", path
    return np.asarray(img).astype(np.int64)


def _grey(expected: np.ndarray) -> np.ndarray:
    return np.repeat(expected[..., None], 3, axis=2).astype(np.int64)


@pytest.fixture(scope="module")
def grey16() -> np.ndarray:
    """A full-range 16-bit gradient: most pixels are far above 255 (a clip turns them all white)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 65536, (40, 48), dtype=np.uint16)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path, grey16):
    path = tmp_path / "g16.png"
    Image.fromarray(grey16).save(path)  # a 16-bit greyscale PNG (Pillow mode I;16)
    assert Image.open(path).mode == "I;16"
    got = _rgb(path)
    assert np.array_equal(got, _grey(grey16 // 256))  # the high byte, as Pillow reduces 16-bit RGB files
    assert (got == 255).mean() < 0.01  # convert("RGB") made 99.6% of such pixels 255


def test_16_bit_pgm_read_as_mode_i_is_scaled(tmp_path, grey16):
    path = tmp_path / "g16.pgm"
    h, w = grey16.shape
    path.write_bytes(f"P5\n{w} {h}\n65535\n".encode() + grey16.astype(">u2").tobytes())
    assert Image.open(path).mode == "I"
    assert np.array_equal(_rgb(path), _grey(grey16 // 256))


def test_16_bit_grey_feeds_the_model_like_its_8_bit_version(tmp_path, grey16):
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray((grey16 // 256).astype(np.uint8), "L").save(tmp_path / "g8.png")
    cfg = DataConfig(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batcher = ImageBatcher([Sample(str(tmp_path / "g16.png"), 0), Sample(str(tmp_path / "g8.png"), 0)], cfg)
    x, _, paths = batcher.tensor()
    assert len(paths) == 2 and not batcher.skipped
    assert np.array_equal(x[0].numpy(), x[1].numpy())


def test_float_grey_in_0_1_is_scaled_and_other_ranges_are_skipped(tmp_path, caplog):
    a = np.random.default_rng(1).random((24, 20), dtype=np.float32)
    Image.fromarray(a).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert np.array_equal(_rgb(tmp_path / "f.tif"), _grey(np.round(a.astype(np.float64) * 255)))
    Image.fromarray(a * 1000).save(tmp_path / "f1000.tif")
    with caplog.at_level(logging.WARNING):
        assert load_image(str(tmp_path / "f1000.tif")) is None
    assert "f1000.tif" in caplog.text and "not 0..1" in caplog.text


def test_32_bit_integers_beyond_16_bits_are_skipped_with_the_reason(tmp_path, caplog):
    a = np.full((8, 8), 70000, dtype=np.int32)
    Image.fromarray(a).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    with caplog.at_level(logging.WARNING):
        assert load_image(str(tmp_path / "i32.tif")) is None
    assert "i32.tif" in caplog.text and "beyond the 16-bit range" in caplog.text


def test_transparency_is_composited_over_white(tmp_path):
    rng = np.random.default_rng(2)
    lum = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    alpha = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(np.stack([lum, alpha], axis=2), "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    a = alpha.astype(np.float64) / 255
    expected = lum * a + 255 * (1 - a)
    assert np.abs(_rgb(tmp_path / "la.png") - _grey(expected)).max() <= 1  # Pillow's integer rounding

    # A palette image whose colour 0 is transparent: those pixels are white, the others their palette colour.
    idx = rng.integers(0, 4, (10, 10), dtype=np.uint8)
    palette = np.array([[0, 0, 0], [200, 10, 10], [10, 200, 10], [10, 10, 200]], dtype=np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette.ravel().tolist())
    p.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P" and "transparency" in Image.open(tmp_path / "p.png").info
    expected_p = np.where((idx == 0)[..., None], 255, palette[idx]).astype(np.int64)
    assert np.array_equal(_rgb(tmp_path / "p.png"), expected_p)


def test_cmyk_and_bilevel(tmp_path):
    rng = np.random.default_rng(3)
    cmyk = rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    c = cmyk.astype(np.float64)
    expected = (255 - c[..., :3]) * (255 - c[..., 3:]) / 255  # the standard CMYK -> RGB without a profile
    assert np.abs(_rgb(tmp_path / "c.tif") - expected).max() <= 1

    bits = rng.integers(0, 2, (9, 9)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert np.array_equal(_rgb(tmp_path / "b.png"), _grey(bits * 255))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG signature and header claiming width x height, with one tiny IDAT: Pillow reads the size
    from the header and refuses before decoding, so nothing of that size is ever allocated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_skipped_with_the_reason(tmp_path, caplog):
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 14000, 14000)  # 196 megapixels, as in the issue; the file is ~100 bytes
    assert bomb.stat().st_size < 200
    with caplog.at_level(logging.WARNING):
        assert load_image(str(bomb)) is None
    assert "bomb.png" in caplog.text and "too large to decode safely" in caplog.text
    assert str(2 * Image.MAX_IMAGE_PIXELS) in caplog.text  # Pillow's limit, kept (178956970 in Pillow 13)


def test_validate_skips_a_decompression_bomb_and_odd_modes(tmp_path, grey16):
    """The user's view: one command over a folder with a 196 MP image and a 16-bit PNG: exit 0, the bomb is
    skipped and named with the reason, the 16-bit image is scored, no traceback."""
    val = tmp_path / "val"
    rng = np.random.default_rng(4)
    for c in ("n01440764", "n02102040"):
        (val / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(val / c / f"{i}.png")
    _png_header_only(val / "n01440764" / "bomb.png", 14000, 14000)
    Image.fromarray(grey16).save(val / "n02102040" / "g16.png")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "train.validate", "--model", "t2t_vit_test", "--data", str(val),
                        "--out", str(out), "--workers", "0", "--threads", "1", "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "bomb.png: too large to decode safely" in r.stderr
    report = json.loads(next(out.glob("validate-*.json")).read_text())
    assert report["images"] == 7 and [Path(p).name for p in report["skipped"]] == ["bomb.png"]

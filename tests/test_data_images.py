"""Host image work: golden PIL resize pairs (exact), the test transform (exact), image modes and truncated files."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from clipreid_jax import data
from clipreid_jax.data import images


def _archs(golden):
  specs = json.loads((golden / "clip_specs.json").read_text())
  return [(arch, specs[arch]) for arch in ("vit", "rn50") if (golden / arch / "pil_resize_pairs.npz").is_file()]


def _pairs(npz):
  return sorted(int(k.split("_")[1]) for k in npz.files if k.startswith("src_"))


def test_pixel_stats_follow_the_official_configs(golden):
  for arch, spec in _archs(golden):
    mean, std = data.pixel_stats(arch)
    assert np.allclose(mean, spec["pixel_mean"]) and np.allclose(std, spec["pixel_std"])
  assert data.pixel_stats("ViT-B-16") == data.PIXEL_STATS["vit"]
  assert data.pixel_stats("RN50") == data.PIXEL_STATS["rn50"]


def test_golden_pil_resize_pairs_exact(golden):
  archs = _archs(golden)
  assert archs, "no pil_resize_pairs.npz in the golden folder"
  for arch, spec in archs:
    z = np.load(golden / arch / "pil_resize_pairs.npz")
    size = tuple(spec["size"])
    for i in _pairs(z):
      src = z[f"src_{i}"]
      np.testing.assert_array_equal(images.resize(src, size, images.BICUBIC), z[f"train_resize_bicubic_{i}"])
      np.testing.assert_array_equal(images.resize(src, size, images.BILINEAR), z[f"test_resize_bilinear_uint8_{i}"])
      expected = z[f"test_transform_{i}"].transpose(1, 2, 0)  # golden CHW, ours HWC
      got = data.test_transform(Image.fromarray(src), size, spec["pixel_mean"], spec["pixel_std"])
      assert got.dtype == np.float32
      np.testing.assert_array_equal(got, expected)


def test_golden_test_transform_through_files_and_device(golden, tmp_path):
  import jax
  for arch, spec in _archs(golden):
    z = np.load(golden / arch / "pil_resize_pairs.npz")
    size = tuple(spec["size"])
    for i in _pairs(z):
      # A lossless file gives the same pixels as the source array.
      path = tmp_path / f"{arch}_{i}.png"
      Image.fromarray(z[f"src_{i}"]).save(path)
      resized = data.load_resized(path, size, images.BILINEAR)
      np.testing.assert_array_equal(resized, z[f"test_resize_bilinear_uint8_{i}"])
      # Device normalisation of the uint8 batch is bit-exact too (table lookup).
      on_device = jax.jit(lambda x, m=tuple(spec["pixel_mean"]), s=tuple(spec["pixel_std"]): data.normalize(x, m, s))
      expected = z[f"test_transform_{i}"].transpose(1, 2, 0)
      np.testing.assert_array_equal(np.asarray(on_device(resized[None]))[0], expected)


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "PNG"),
                                      ("I;16", "PNG"), ("1", "PNG")])
def test_image_modes_become_rgb(tmp_path, mode, fmt):
  img = Image.new("RGB", (10, 20), (200, 100, 50)).convert(mode)
  path = tmp_path / f"x.{fmt.lower()}"
  img.save(path, fmt)
  out = data.read_image(path)
  assert out.mode == "RGB" and out.size == (10, 20)
  arr = data.load_resized(path, (8, 4))
  assert arr.shape == (8, 4, 3) and arr.dtype == np.uint8


def test_resize_of_a_picture_of_the_transposed_size():
  """A landscape picture whose (width, height) is the (height, width) asked for is resized, not passed through."""
  wide = np.arange(32 * 64 * 3, dtype=np.uint32).reshape(32, 64, 3).astype(np.uint8)  # height 32, width 64
  out = images.resize(wide, (64, 32))
  assert out.shape == (64, 32, 3)
  np.testing.assert_array_equal(out, np.asarray(Image.fromarray(wide).resize((32, 64), images.BILINEAR)))


@pytest.mark.parametrize("hw", [(100, 64), (128, 50)], ids=["height_differs", "width_differs"])
def test_resize_when_only_one_side_differs(hw):
  """A picture that already has the asked width (or height) is still resized to the asked height (or width)."""
  img = np.arange(hw[0] * hw[1] * 3, dtype=np.uint32).reshape(*hw, 3).astype(np.uint8)
  out = images.resize(img, (128, 64))
  assert out.shape == (128, 64, 3)
  np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((64, 128), images.BILINEAR)))


def test_grayscale_is_replicated(tmp_path):
  Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
  assert np.all(np.asarray(data.read_image(tmp_path / "g.png")) == 77)


def test_16_bit_gray_keeps_its_range(tmp_path):
  """A 16-bit gray PNG becomes its top byte, not PIL's convert("RGB"), which clips every value above 255 to white."""
  values = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)  # 0 .. 63,000
  Image.fromarray(values).save(tmp_path / "g16.png")
  out = np.asarray(data.read_image(tmp_path / "g16.png"))
  np.testing.assert_array_equal(out[..., 0], values >> 8)
  assert np.all(out[..., 0] == out[..., 2]) and out.max() == 63000 >> 8


def test_16_bit_pgm_keeps_its_range(tmp_path):
  """A 16-bit PGM (thermal and depth cameras write them) opens as PIL mode "I", which convert("RGB") clipped at 255
  as it did 16-bit PNGs: 99% of the picture white. It becomes its top byte, as the PNG does; an "I" image holding
  8-bit values converts as before."""
  values = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)  # 0 .. 63,000
  (tmp_path / "g16.pgm").write_bytes(b"P5\n8 8\n65535\n" + values.astype(">u2").tobytes())
  out = np.asarray(data.read_image(tmp_path / "g16.pgm"))
  np.testing.assert_array_equal(out[..., 0], values >> 8)
  small = Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 4)  # mode "I", values 0..252
  np.testing.assert_array_equal(np.asarray(images.to_rgb(small))[..., 1], np.arange(64).reshape(8, 8) * 4)


def test_truncated_jpeg_loads_with_a_warning(tmp_path):
  rng = np.random.default_rng(1)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
  full = buf.getvalue()
  path = tmp_path / "cut.jpg"
  path.write_bytes(full[:len(full) * 2 // 3])
  with pytest.warns(data.DataWarning, match="cut.jpg: truncated"):
    img = data.read_image(path)
  assert img.size == (32, 64) and img.mode == "RGB"
  # The decoded top rows equal those of the complete file.
  complete = np.asarray(Image.open(io.BytesIO(full)).convert("RGB"))
  np.testing.assert_array_equal(np.asarray(img)[:8], complete[:8])


def test_truncated_png_loads_with_a_warning(tmp_path):
  rng = np.random.default_rng(2)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(buf, "PNG")
  path = tmp_path / "cut.png"
  path.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  with pytest.warns(data.DataWarning, match="cut.png: truncated"):
    img = data.read_image(path)
  assert img.size == (32, 64)
  from PIL import ImageFile
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the module-wide flag is restored

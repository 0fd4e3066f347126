"""Flax CLIP equals OpenAI's PyTorch CLIP (openai-clip package, random weights), directly and through
`python -m clipreid_jax.convert clip`; positional-embedding resize equals torch and the golden files."""
import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_reference import random_clip, rel_err, state_dict_numpy
from clipreid_jax import convert
from clipreid_jax.models.clip import CLIP, load_clip
from clipreid_jax.tokenizer import tokenize
from conftest import golden_root

TEXTS = ["a photo of a person", "A photo of a X X X X vehicle.", "two dogs playing in the snow, at night"]
SMALL = {
    "vit": dict(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=128, vision_patch_size=16),
    "resnet": dict(embed_dim=32, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16, vision_patch_size=None),
}


def torch_outputs(model, images_nchw, tokens):
  with torch.no_grad():
    return (model.encode_image(torch.from_numpy(images_nchw)).numpy(),
            model.encode_text(torch.from_numpy(tokens).long()).numpy())


def flax_outputs(model, variables, images_nchw, tokens):
  img = model.apply(variables, images_nchw.transpose(0, 2, 3, 1), method=model.encode_image)
  txt = model.apply(variables, tokens, method=model.encode_text)
  return np.asarray(img), np.asarray(txt)


def images(n, res, seed=0):
  return np.random.RandomState(seed).randn(n, 3, res, res).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(SMALL))
def small(request):
  model = random_clip(3, **SMALL[request.param])
  return request.param, model, state_dict_numpy(model)


def test_small_parity(small):
  _, tmodel, sd = small
  cfg, variables = convert.clip_variables(sd, convert.infer_clip_config(sd))
  x, toks = images(3, 64), tokenize(TEXTS)
  ref_img, ref_txt = torch_outputs(tmodel, x, toks)
  img, txt = flax_outputs(CLIP(cfg), variables, x, toks)
  assert rel_err(img, ref_img) <= 1e-5
  assert rel_err(txt, ref_txt) <= 1e-5


def test_text_truncation_is_exact(small):
  _, _, sd = small
  cfg, variables = convert.clip_variables(sd, convert.infer_clip_config(sd))
  model, toks = CLIP(cfg), tokenize(TEXTS)
  full = model.apply(variables, toks, False, method=model.encode_text)
  short = model.apply(variables, toks, True, method=model.encode_text)
  jitted = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))(variables, toks)  # traced: no truncation
  # Mathematically identical; float32 rounding differs only because the matmul shapes do.
  assert rel_err(short, full) <= 2e-6 and rel_err(jitted, full) <= 2e-6


def test_bfloat16_compute_keeps_float32_params(small):
  _, tmodel, sd = small
  cfg, variables = convert.clip_variables(sd, convert.infer_clip_config(sd))
  x, toks = images(2, 64), tokenize(TEXTS[:2])
  ref_img, _ = torch_outputs(tmodel, x, toks)
  model = CLIP(cfg, dtype=jax.numpy.bfloat16)
  out = model.apply(variables, x.transpose(0, 2, 3, 1), method=model.encode_image)
  assert out.dtype == jax.numpy.bfloat16
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(variables["params"]))
  assert rel_err(np.asarray(out, np.float32), ref_img) < 0.1  # bfloat16 has 8 bits of mantissa


@pytest.mark.parametrize("arch", ["ViT-B/16", "RN50"])
def test_full_size_parity(arch):
  """The real ViT-B/16 and RN50 sizes once, at 224x224, from random weights."""
  if arch == "ViT-B/16":
    kw = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16)
  else:
    kw = dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None)
  tmodel = random_clip(5, transformer_width=512, transformer_heads=8, transformer_layers=12, **kw)
  sd = state_dict_numpy(tmodel)
  cfg = convert.infer_clip_config(sd)
  assert (cfg.vision_grid, cfg.text_width, cfg.text_layers) == ((14, 14) if cfg.is_vit else (7, 7), 512, 12)
  assert cfg.name == arch.replace("/", "-")  # the name the logs and the backbone check use
  cfg, variables = convert.clip_variables(sd, cfg)
  del sd
  x, toks = images(1, 224), tokenize(TEXTS[:2])
  ref_img, ref_txt = torch_outputs(tmodel, x, toks)
  img, txt = flax_outputs(CLIP(cfg), variables, x, toks)
  assert rel_err(img, ref_img) <= 1e-5
  assert rel_err(txt, ref_txt) <= 1e-5


def test_names_of_the_released_clips_and_of_other_sizes():
  from clipreid_jax.models.clip import CLIPConfig
  assert CLIPConfig(embed_dim=768, vision_layers=24, vision_width=1024, vision_patch_size=14).name == "ViT-L-14"
  assert CLIPConfig(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=32).name == "ViT-B-32"
  assert CLIPConfig(embed_dim=512, vision_layers=(3, 4, 23, 3), vision_width=64).name == "RN101"
  assert CLIPConfig(embed_dim=32, vision_layers=2, vision_width=128).name == "ViT (width 128, depth 2, patch 16)"
  rn = CLIPConfig(embed_dim=32, vision_layers=(1, 2, 1, 1), vision_width=16)
  assert rn.name == "RN (width 16, stages (1, 2, 1, 1))"


# --- conversion command ------------------------------------------------------------------------


def _write_safetensors(path, sd):
  header, blobs, offset = {}, [], 0
  for k, v in sd.items():
    b = np.ascontiguousarray(v).tobytes()
    header[k] = {"dtype": {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64"}[v.dtype],
                 "shape": list(v.shape), "data_offsets": [offset, offset + len(b)]}
    blobs.append(b)
    offset += len(b)
  h = json.dumps(header).encode()
  path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "npz", "torchscript"])
def test_convert_command_roundtrip(small, tmp_path, fmt):
  _, tmodel, sd = small
  x, toks = images(2, 64, seed=1), tokenize(TEXTS)
  if fmt == "pth":
    src = tmp_path / "clip.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)
  elif fmt == "safetensors":
    src = tmp_path / "clip.safetensors"
    _write_safetensors(src, sd)
  elif fmt == "npz":
    src = tmp_path / "clip.npz"
    np.savez(src, **sd)
  else:
    src = tmp_path / "my_clip.pt"
    traced = torch.jit.trace(tmodel, (torch.from_numpy(x), torch.from_numpy(toks).long()), check_trace=False)
    traced.save(str(src))
    assert convert.main(["clip", str(src), str(tmp_path / "untrusted")]) == 2  # unknown archive: needs --trust
    assert not (tmp_path / "untrusted").exists()
  args = ["clip", str(src), str(tmp_path / "out")] + (["--trust"] if fmt == "torchscript" else [])
  assert convert.main(args) == 0
  model, variables = load_clip(tmp_path / "out")
  ref_img, ref_txt = torch_outputs(tmodel, x, toks)
  img, txt = flax_outputs(model, variables, x, toks)
  assert rel_err(img, ref_img) <= 1e-5
  assert rel_err(txt, ref_txt) <= 1e-5
  assert json.loads((tmp_path / "out" / "config.json").read_text())["kind"] == "clip"
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_convert_resizes_for_reid_grid(tmp_path):
  tmodel = random_clip(7, **SMALL["vit"])
  sd = state_dict_numpy(tmodel)
  src = tmp_path / "clip.npz"
  np.savez(src, **sd)
  assert convert.main(["clip", str(src), str(tmp_path / "out"), "--input_size", "64", "40", "--stride", "12"]) == 0
  model, variables = load_clip(tmp_path / "out")
  assert model.config.vision_grid == (5, 3) and model.config.vision_stride == 12
  pos = np.asarray(variables["params"]["visual"]["positional_embedding"])
  np.testing.assert_array_equal(pos, convert.resize_pos_embed(sd["visual.positional_embedding"], (5, 3)))
  out = model.apply(variables, np.zeros((1, 64, 40, 3), np.float32), method=model.encode_image)
  assert out.shape == (1, 32)


# --- positional-embedding resize ---------------------------------------------------------------


@pytest.mark.parametrize("src_grid", [14, 7])
@pytest.mark.parametrize("out_hw", [(16, 8), (21, 10), (16, 16), (21, 21)])
def test_resize_matches_torch(src_grid, out_hw):
  pe = np.random.RandomState(src_grid).randn(src_grid * src_grid + 1, 96).astype(np.float32)
  grid = torch.from_numpy(pe[1:].reshape(1, src_grid, src_grid, -1)).permute(0, 3, 1, 2)
  ref = F.interpolate(grid, size=out_hw, mode="bilinear").permute(0, 2, 3, 1).reshape(-1, 96).numpy()
  out = convert.resize_pos_embed(pe, out_hw)
  assert out.shape == (out_hw[0] * out_hw[1] + 1, 96)
  np.testing.assert_array_equal(out[0], pe[0])
  # torch's vectorised kernel rounds in another order: equal to within 2 float32 ulp of the values
  np.testing.assert_allclose(out[1:], ref, rtol=0, atol=2 * np.finfo(np.float32).eps * np.abs(ref).max())


def test_resize_from_a_non_square_grid_matches_torch():
  """in_hw is (rows, columns) of the source grid, as a ReID table (e.g. 16x8) is laid out."""
  pe = np.random.RandomState(0).randn(6 * 3 + 1, 8).astype(np.float32)
  grid = torch.from_numpy(pe[1:].reshape(1, 6, 3, -1)).permute(0, 3, 1, 2)
  ref = F.interpolate(grid, size=(4, 5), mode="bilinear").permute(0, 2, 3, 1).reshape(-1, 8).numpy()
  out = convert.resize_pos_embed(pe, (4, 5), in_hw=(6, 3))
  assert out.shape == (4 * 5 + 1, 8)
  np.testing.assert_allclose(out[1:], ref, rtol=0, atol=2 * np.finfo(np.float32).eps * np.abs(ref).max())


def _golden_resize_cases():
  cases = []
  for arch_dir in sorted(p for p in golden_root().iterdir() if (p / "clip_openai_layout.npz").is_file()):
    for variant in sorted(p for p in arch_dir.iterdir() if (p / "model_state.npz").is_file()):
      cases.append(variant)
  return cases


@pytest.mark.parametrize("variant", _golden_resize_cases(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_resize_matches_golden(variant):
  clip_sd = dict(np.load(variant.parent / "clip_openai_layout.npz"))
  state = np.load(variant / "model_state.npz")
  for clip_key, reid_key in [("visual.positional_embedding", "image_encoder.positional_embedding"),
                             ("visual.attnpool.positional_embedding", "image_encoder.attnpool.positional_embedding")]:
    if clip_key in clip_sd:
      ref = state[reid_key]
      grid = tuple(json.loads((variant / "meta.json").read_text())["grid_hw"])
      out = convert.resize_pos_embed(clip_sd[clip_key], grid)
      np.testing.assert_allclose(out, ref, rtol=0, atol=2 * np.finfo(np.float32).eps * np.abs(ref).max())


def test_golden_clip_files_convert(tmp_path):
  """The golden tiny CLIP files (OpenAI layout, float16 token embedding) convert and run."""
  found = 0
  for arch_dir in sorted(p for p in golden_root().iterdir() if (p / "clip_openai_layout.npz").is_file()):
    dst = tmp_path / arch_dir.name
    assert convert.main(["clip", str(arch_dir / "clip_openai_layout.npz"), str(dst)]) == 0
    model, variables = load_clip(dst)
    assert variables["params"]["token_embedding"]["embedding"].dtype == np.float32
    h, w = model.config.input_size()
    assert model.apply(variables, np.zeros((2, h, w, 3), np.float32), method=model.encode_image).shape == (2, model.config.embed_dim)
    found += 1
  assert found


# --- bad input -------------------------------------------------------------------------------------


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "clipreid_jax.convert", *map(str, args)], capture_output=True, text=True)


def test_bad_inputs_exit_2_and_write_nothing(small, tmp_path):
  _, tmodel, sd = small
  good = tmp_path / "good.pth"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, good)
  notckpt = tmp_path / "notes.pth"
  notckpt.write_text("this is not a checkpoint\n")
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  unknown = tmp_path / "unknown.npz"
  np.savez(unknown, **{"foo.weight": np.zeros((3, 3), np.float32)})
  fake_openai = tmp_path / "ViT-B-16.pt"
  torch.jit.trace(tmodel, (torch.zeros(1, 3, 64, 64), torch.from_numpy(tokenize("x")).long()), check_trace=False).save(str(fake_openai))
  pickled = tmp_path / "code.pth"
  torch.save({"w": torch.zeros(2), "cfg": pathlib.Path("x")}, pickled)
  cases = [(notckpt, "notes.pth"), (truncated, "truncated.pth"), (unknown, "unknown architecture"),
           (fake_openai, "SHA-256"), (pickled, "not a plain state dict"), (tmp_path / "missing.pt", "no such file")]
  for src, expected in cases:
    dst = tmp_path / f"out_{src.stem}"
    result = _run_cli("clip", src, dst)
    assert result.returncode == 2, (src, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(src.name) in lines[0], lines
    assert not dst.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _safetensors(header, data=b""):
  h = json.dumps(header).encode()
  return len(h).to_bytes(8, "little") + h + data


def _npz_with(**changes):
  """Writer of the small ViT's state dict with some tensors replaced (key -> function of the original)."""
  def write(path, sd):
    np.savez(path, **{k: changes[k](v) if k in changes else v for k, v in sd.items()})
  return write


# name -> (command, file name, writer(path, ViT state dict), words the error must contain)
MALFORMED = {
    "header_list": ("clip", "a.safetensors", lambda p, sd: p.write_bytes(_safetensors([1, 2])), "expected an object"),
    "entry_not_object": ("clip", "a.safetensors", lambda p, sd: p.write_bytes(_safetensors({"a": 5})),
                         "expected an object"),
    "no_data_offsets": ("clip", "a.safetensors",
                        lambda p, sd: p.write_bytes(_safetensors({"a": {"dtype": "F32", "shape": [2]}}, bytes(8))),
                        "data_offsets"),
    "size_mismatch": ("clip", "a.safetensors", lambda p, sd: p.write_bytes(
        _safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8))), "needs 12"),
    "tensor_one_byte_short": ("clip", "a.safetensors", lambda p, sd: p.write_bytes(
        _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(7))), "truncated"),
    "header_length_2**63": ("clip", "a.safetensors", lambda p, sd: p.write_bytes((2**63).to_bytes(8, "little") + b"{}"),
                            "truncated or corrupt"),
    "text_projection_1d": ("clip", "a.npz", _npz_with(text_projection=np.ravel), "2-D"),
    "ln_final_0d": ("clip", "a.npz", _npz_with(**{"ln_final.weight": lambda v: v[0]}), "1-D"),
    "conv1_1d": ("clip", "a.npz", _npz_with(**{"visual.conv1.weight": np.ravel}), "4-D"),  # once asked for TiBs
    "grid_not_square": ("clip", "a.npz", _npz_with(**{"visual.positional_embedding": lambda v: v[:-1]}), "square"),
    "int_keys": ("clipreid", "a.pth", lambda p, sd: torch.save({1: torch.zeros(2)}, p), "not a string"),
    "nan_weights": ("clip", "a.npz", _npz_with(**{"ln_final.weight": lambda v: np.full_like(v, np.nan)}),
                    "tensor 'ln_final.weight' holds NaN or infinite values; expected finite weights"),
    # An infinite weight (a diverged run) without any NaN: every feature would be NaN or infinite all the same.
    "inf_weights": ("clip", "a.npz", _npz_with(**{"ln_final.weight": lambda v: np.where(np.arange(v.size) == 0,
                                                                                         np.inf, v)}),
                    "tensor 'ln_final.weight' holds NaN or infinite values; expected finite weights"),
    # Text files named .pt: torch's whole message is "101" (a KeyError of the first byte), or a weights_only refusal
    # that blames an "Unsupported operand" and suggests weights_only=False.
    "text_file": ("clip", "a.pt", lambda p, sd: p.write_text("hello"),
                  "not a PyTorch checkpoint (its bytes are neither a torch.save archive nor a pickle); expected a file "
                  "written by torch.save"),
    "garbage_file": ("clip", "a.pt", lambda p, sd: p.write_text("garbage\n"),
                     "not a PyTorch checkpoint (its bytes are neither a torch.save archive nor a pickle)"),
    # A legacy (pre-zip) pickle cut short: torch's own reason.
    "legacy_truncated": ("clip", "a.pt", lambda p, sd: p.write_bytes(b"\x80\x02}q\x00"),
                         "not a readable PyTorch checkpoint ("),
}


@pytest.fixture(scope="module")
def vit_sd():
  return state_dict_numpy(random_clip(3, **SMALL["vit"]))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_exit_2_with_one_line(vit_sd, tmp_path, capsys, case):
  kind, name, write, expected = MALFORMED[case]
  src, dst = tmp_path / name, tmp_path / "out"
  write(src, vit_sd)
  assert convert.main([kind, str(src), str(dst)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {src}: ") and expected in err[0], err
  assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_destination_is_kept(small, tmp_path, capsys):
  _, _, sd = small
  src = tmp_path / "clip.npz"
  np.savez(src, **sd)
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "precious.txt").write_text("keep me")
  assert convert.main(["clip", str(src), str(dst)]) == 2
  assert (dst / "precious.txt").read_text() == "keep me"
  # --overwrite replaces a model directory only: pointed at any other folder (a training workdir) it deleted it.
  assert convert.main(["clip", str(src), str(dst), "--overwrite"]) == 2
  assert "exists and is not a model directory (it holds precious.txt); not replacing it" in capsys.readouterr().err
  assert sorted(p.name for p in dst.iterdir()) == ["precious.txt"]
  (dst / "precious.txt").unlink()
  assert convert.main(["clip", str(src), str(dst), "--overwrite"]) == 0  # an empty folder
  meta = json.loads((dst / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps({**meta, "note": "the previous conversion"}))
  assert convert.main(["clip", str(src), str(dst), "--overwrite"]) == 0  # a model directory
  assert json.loads((dst / "config.json").read_text()) == meta
  assert sorted(p.name for p in dst.iterdir()) == ["config.json", "variables"]
  capsys.readouterr()
  # A destination below a file: one line, not a FileExistsError traceback.
  assert convert.main(["clip", str(src), str(src / "sub")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "cannot create its folder" in err[0] and str(src) in err[0], err


def test_atomic_directory_leaves_no_staging_or_old_copy(tmp_path):
  """A block that fails leaves neither the destination nor its staging folder; a replaced directory's old copy is
  removed once the new one is in place."""
  from clipreid_jax import checkpoints  # pylint: disable=g-import-not-at-top
  dst = tmp_path / "model"
  with pytest.raises(RuntimeError, match="half way"):
    with checkpoints.atomic_directory(dst) as stage:
      (stage / "config.json").write_text("{}")
      raise RuntimeError("half way")
  assert sorted(tmp_path.iterdir()) == []
  for version in (1, 2):  # a model directory, then its replacement
    with checkpoints.atomic_directory(dst, overwrite=version > 1) as stage:
      (stage / "variables").mkdir()
      (stage / "config.json").write_text(json.dumps({"kind": "clip", "version": version}))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
  assert json.loads((dst / "config.json").read_text())["version"] == 2
  with pytest.raises(RuntimeError, match="again"):  # a failed replacement keeps the one in place
    with checkpoints.atomic_directory(dst, overwrite=True) as stage:
      raise RuntimeError("again")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
  assert json.loads((dst / "config.json").read_text())["version"] == 2


def test_a_model_directory_is_replaced_only_with_overwrite(tmp_path):
  """Without --overwrite an existing destination is refused, even a model directory (which --overwrite may
  replace): the model in place is kept whole and no staging folder is left beside it."""
  from clipreid_jax import checkpoints  # pylint: disable=g-import-not-at-top
  dst = tmp_path / "model"
  with checkpoints.atomic_directory(dst) as stage:
    (stage / "variables").mkdir()
    (stage / "config.json").write_text(json.dumps({"kind": "clip", "version": 1}))
  with pytest.raises(checkpoints.CheckpointError, match=r"model: already exists; choose a new destination or pass "
                     "--overwrite"):
    with checkpoints.atomic_directory(dst) as stage:
      (stage / "variables").mkdir()
      (stage / "config.json").write_text(json.dumps({"kind": "clip", "version": 2}))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
  assert json.loads((dst / "config.json").read_text())["version"] == 1


def test_a_model_directory_without_its_variables_is_named_incomplete(tmp_path):
  """config.json without variables/ (a copy cut short): the error names the missing folder, not orbax's reason."""
  from clipreid_jax import checkpoints  # pylint: disable=g-import-not-at-top
  (tmp_path / "config.json").write_text(json.dumps({"kind": "clip"}))
  with pytest.raises(checkpoints.CheckpointError, match=r"variables: not found; the model directory is incomplete$"):
    checkpoints.restore_variables(tmp_path)


def test_restore_reason_is_the_first_line_without_tensorstore_details():
  from clipreid_jax import checkpoints  # pylint: disable=g-import-not-at-top
  e = ValueError("Error reading \"a\": truncated file See full TensorStore details: {spec...}\nsecond line")
  assert checkpoints.restore_reason(e) == 'Error reading "a": truncated file'
  assert checkpoints.restore_reason(RuntimeError()) == "RuntimeError"
  try:  # orbax's wrapper names a slice; the TensorStore error it wraps names the array and what is wrong
    raise Exception("Encountered error while reading array index: (slice(0, 8, 1),). See full TensorStore details") \
        from ValueError('OUT_OF_RANGE: Error reading "k/0.0" in OCDBT database at local file "/c/19/state/": '
                        'Requested byte range [9, 99) is not valid for value of size 5')
  except Exception as wrapped:  # pylint: disable=broad-except
    assert checkpoints.restore_reason(wrapped) == ('OUT_OF_RANGE: Error reading "k/0.0": Requested byte range [9, 99) '
                                                   'is not valid for value of size 5')


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_state_dict_wrapped_in_a_checkpoint_dict_is_read(tmp_path, wrapper):
  """torch.save({"state_dict": sd}) and {"model": sd} (training checkpoints) read as the plain state dict."""
  from clipreid_jax.state_dicts import read_state_dict  # pylint: disable=g-import-not-at-top
  sd = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
  torch.save({wrapper: sd, "epoch": 3}, tmp_path / "ckpt.pth")
  got = read_state_dict(tmp_path / "ckpt.pth")
  assert sorted(got) == ["a.weight", "b"] and got["b"].dtype == np.float32
  np.testing.assert_array_equal(got["a.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_a_data_parallel_prefix_is_dropped_only_where_every_key_has_it(tmp_path):
  """A state dict saved from DataParallel ("module." before every key) reads under the plain names; where only some
  keys start with "module." (a module of that name), no name is cut."""
  from clipreid_jax.state_dicts import read_state_dict  # pylint: disable=g-import-not-at-top
  np.savez(tmp_path / "dp.npz", **{"module.a.weight": np.ones(2, np.float32), "module.b": np.zeros(3, np.float32)})
  assert sorted(read_state_dict(tmp_path / "dp.npz")) == ["a.weight", "b"]
  np.savez(tmp_path / "mixed.npz", **{"module.a.weight": np.ones(2, np.float32), "b": np.zeros(3, np.float32)})
  assert sorted(read_state_dict(tmp_path / "mixed.npz")) == ["b", "module.a.weight"]


def _tiny_clip(vision_layers: int):
  """(model, variables, images, tokens) of a small random CLIP, converted as the trainer converts one."""
  sd = state_dict_numpy(random_clip(5, embed_dim=32, image_resolution=64, vision_layers=vision_layers,
                                    vision_width=128, vision_patch_size=16, transformer_layers=2))
  cfg, variables = convert.clip_variables(sd, convert.infer_clip_config(sd))
  return CLIP(cfg), variables, images(2, 64).transpose(0, 2, 3, 1), tokenize(TEXTS[:2])


def _both_towers_loss(model, variables, x, toks):
  """params -> a scalar of both towers' outputs (a causal text stack included), for comparing gradients."""
  def loss(params):
    v = {**variables, "params": params}
    return ((model.apply(v, x, method=model.encode_image) ** 2).sum()
            + (model.apply(v, toks, method=model.encode_text) ** 2).sum())
  return loss


def _compiled_off_and_on(monkeypatch, setting: str, loss, params, exact: dict | None = None) -> dict:
  """Compiles value_and_grad(loss) with clip.<setting> False and True and returns each one's optimised HLO text.

  Where the rewrite keeps every sum's order (`exact` None), the loss and every gradient must agree to rtol 1e-5 or
  1e-7 of the gradient's largest magnitude. Where it sums in another order, float32 rounding moves both results by
  amounts that depend on the CPU's kernels, so both are compared with `exact` (the same value_and_grad in float64):
  the rewrite's worst error, relative to each tensor's largest magnitude, must stay within 3x XLA's own."""
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  results, hlo = {}, {}
  for flag in (False, True):
    monkeypatch.setattr(clip_lib, setting, flag)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    hlo[flag] = compiled.as_text()
    results[flag] = compiled(params)
  (ref_loss, ref_grads), (got_loss, got_grads) = results[False], results[True]
  assert jax.tree.structure(got_grads) == jax.tree.structure(ref_grads)
  if exact is None:
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                 atol=1e-7 * float(np.abs(b).max()) + 1e-12)
    return hlo
  exact_loss, exact_grads = exact["loss"], exact["grads"]
  assert jax.tree.structure(exact_grads) == jax.tree.structure(ref_grads)

  def worst(grads):
    return max(float(np.abs(np.asarray(g, np.float64) - e).max() / max(np.abs(e).max(), 1e-30))  # logit_scale: 0
               for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(exact_grads)))
  assert worst(got_grads) <= 3 * worst(ref_grads), (worst(got_grads), worst(ref_grads))
  assert abs(float(got_loss) - exact_loss) <= 3 * abs(float(ref_loss) - exact_loss) + 1e-7 * abs(exact_loss)
  return hlo


def _float64_value_and_grad(model, variables, x, toks) -> dict:
  """`_both_towers_loss`'s value and gradients computed in float64 throughout (XLA's attention)."""
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    wide = jax.tree.map(lambda a: np.asarray(a, np.float64) if np.asarray(a).dtype == np.float32 else a, variables)
    loss64 = _both_towers_loss(CLIP(model.config, dtype=np.float64), wide, np.asarray(x, np.float64), toks)
    setting = clip_lib.EXPLICIT_ATTENTION_GRADIENTS
    clip_lib.EXPLICIT_ATTENTION_GRADIENTS = False
    try:
      value, grads = jax.jit(jax.value_and_grad(loss64))(wide["params"])
    finally:
      clip_lib.EXPLICIT_ATTENTION_GRADIENTS = setting
    assert jax.tree.leaves(grads)[0].dtype == np.float64
    return {"loss": float(value), "grads": jax.tree.map(np.asarray, grads)}


def test_gradient_barriers_are_exact_and_bound_the_fusions(monkeypatch):
  """clip.GRADIENT_BARRIERS (the CPU default) leaves the loss and every gradient unchanged and puts one conditional per
  block into the compiled backward pass. Without barriers XLA:CPU fuses the residual stream's gradient chain into
  every block, so the largest fusion grows with depth (quadratic work); with them it does not grow."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
  from profile_step import largest_fusion  # pylint: disable=g-import-not-at-top
  largest = {}
  for layers in (3, 6):
    model, variables, x, _ = _tiny_clip(layers)

    def loss(params, model=model, variables=variables, x=x):
      return (model.apply({**variables, "params": params}, x, method=model.encode_image) ** 2).sum()

    hlo = _compiled_off_and_on(monkeypatch, "GRADIENT_BARRIERS", loss, variables["params"])
    for flag in (False, True):
      assert len(re.findall(r" conditional\(", hlo[flag])) == (layers if flag else 0)
      largest[layers, flag] = largest_fusion(hlo[flag])
  assert largest[6, True] <= largest[3, True] < largest[3, False] < largest[6, False], largest


def test_explicit_weight_gradients_are_exact(monkeypatch):
  """clip.EXPLICIT_WEIGHT_GRADIENTS (the CPU default) writes each transformer dense layer's backward pass out; the
  loss and every gradient (both towers, a causal text stack included) equal JAX's own derivation, and no weight-gradient
  product reads a transposed copy of the output gradient any more (a dot contracting its right operand's minor axis:
  that operand was written transposed for it)."""
  model, variables, x, toks = _tiny_clip(3)
  loss = _both_towers_loss(model, variables, x, toks)

  hlo = _compiled_off_and_on(monkeypatch, "EXPLICIT_WEIGHT_GRADIENTS", loss, variables["params"])
  transposed_operand_dots = {flag: len(re.findall(r"lhs_contracting_dims=\{0\}, rhs_contracting_dims=\{1\}", text))
                             for flag, text in hlo.items()}
  assert transposed_operand_dots[True] == 0 < transposed_operand_dots[False], transposed_operand_dots


@pytest.mark.parametrize("batch,queries,keys,causal", [(2, 9, 9, False), (2, 1, 9, False), (2, 9, 9, True),
                                                       (3, 9, 9, False)])
def test_explicit_attention_matches_jax(batch, queries, keys, causal):
  """clip.explicit_attention is jax.nn.dot_product_attention: output and the three input gradients, for full
  self-attention, the class-token-only query of the last ViT block and the causal text stack, at a head width whose
  1/sqrt(d) is not a power of two; an even batch (run in two halves) and an odd one."""
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  q = rng.standard_normal((batch, queries, 3, 24)).astype(np.float32)
  k, v = (rng.standard_normal((batch, keys, 3, 24)).astype(np.float32) for _ in range(2))
  g = rng.standard_normal(q.shape).astype(np.float32)
  results = []
  for fn in (lambda *a: jax.nn.dot_product_attention(*a, is_causal=causal),
             lambda *a: clip_lib.explicit_attention(*a, causal)):
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    results.append((out, *vjp(g)))
  for ref, got in zip(*results):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_explicit_attention_gradients_are_exact_and_move_no_score_matrix(monkeypatch):
  """clip.EXPLICIT_ATTENTION_GRADIENTS (the CPU default): the loss and every gradient of both towers equal those of
  XLA's attention, and the compiled backward pass no longer copies or transposes a (batch, heads, tokens, tokens)
  array (XLA's derivation moves the probabilities and score gradients to feed the key and value gradients)."""
  model, variables, x, toks = _tiny_clip(3)
  loss = _both_towers_loss(model, variables, x, toks)

  # The written-out products sum in another order than XLA's (k^T ds instead of ds^T k, ...): both are compared with
  # a float64 evaluation (float32 rounding moved an element by 1.4e-6 of its tensor's largest on an AMD EPYC host,
  # with XLA's own worst error there 7e-7; the barrier and weight-gradient rewrites above keep every sum's order).
  hlo = _compiled_off_and_on(monkeypatch, "EXPLICIT_ATTENTION_GRADIENTS", loss, variables["params"],
                             exact=_float64_value_and_grad(model, variables, x, toks))
  # the image tower's score matrices: 2 heads, 17 tokens (16 patches and the class token), any batch (the written-out
  # form runs the batch in two halves)
  score_moves = r"= f32\[\d+,2,17,17[,\]][^=]*? (?:copy|transpose)\("
  moves = {flag: len(re.findall(score_moves, text)) for flag, text in hlo.items()}
  assert moves[True] == 0 < moves[False], moves


def test_gradient_barrier_off_the_cpu_is_an_optimization_barrier(monkeypatch):
  """For GPU and TPU the barrier is an optimization barrier (their compilers keep it through fusion; no conditional
  that would wait for the host): it is in the lowered program and the gradient is unchanged."""
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(clip_lib, "_target_platform", lambda: "gpu")
  g = np.arange(6, dtype=np.float32) - 2.5
  grad = jax.jit(jax.grad(lambda t: jax.numpy.vdot(clip_lib.gradient_barrier(t), g)))
  lowered = grad.lower(np.zeros(6, np.float32)).as_text()
  assert "optimization_barrier" in lowered and "case" not in lowered
  np.testing.assert_array_equal(np.asarray(grad(np.zeros(6, np.float32))), g)


def test_gradient_barrier_is_the_identity_for_every_float():
  """Both branches of the barrier's conditional return the gradient bit for bit: -0.0, infinities and NaN too."""
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  for first in (1.0, np.nan):  # the predicate's two outcomes
    g = np.array([first, -0.0, 0.0, np.inf, -np.inf, np.nan, 3.5e-39, -1.25], np.float32)
    got = jax.jit(jax.grad(lambda t, g=g: jax.numpy.vdot(clip_lib.gradient_barrier(t), g)))(np.zeros(8, np.float32))
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), g.view(np.uint32))


def test_cudnn_attention_falls_back_off_gpu(monkeypatch):
  """cuDNN attention is asked for only where it can run: an init on the host CPU of a GPU machine keeps XLA's."""
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(clip_lib, "ATTENTION_IMPLEMENTATION", "cudnn")
  q = jax.numpy.ones((1, 5, 2, 8), jax.numpy.bfloat16)
  with jax.default_device(jax.devices("cpu")[0]):
    assert clip_lib._target_platform() == "cpu"  # pylint: disable=protected-access
    out = clip_lib.attention(q, q, q)
  assert out.shape == q.shape


def _asked_for(monkeypatch, q, k, *, gpu: bool, ampere: bool) -> list:
  """The `implementation` clip.attention hands jax.nn.dot_product_attention, on a pretended GPU backend."""
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  asked = []
  real = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    asked.append(implementation)
    return real(*args, **kwargs)  # XLA's, which runs here

  monkeypatch.setattr(clip_lib, "ATTENTION_IMPLEMENTATION", "cudnn")
  monkeypatch.setattr(clip_lib, "_target_platform", lambda: "gpu" if gpu else "cpu")
  monkeypatch.setattr(clip_lib, "_cudnn_flash_attention_available", lambda: ampere)
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  assert clip_lib.attention(q, k, k).shape == q.shape
  return asked


@pytest.mark.parametrize("case,expected", [
    ("ampere, bf16, head 64", "cudnn"),
    ("pre-ampere (V100, T4) or ROCm", None),
    ("float32", None),
    ("head 12 (not a multiple of 8)", None),
    ("head 160 (above 128)", None),
    ("one query, 5 keys (the ViT's class-token-only block)", None),
])
def test_cudnn_attention_only_where_cudnn_runs(monkeypatch, case, expected):
  """The default (cuDNN) falls back to XLA's attention wherever cuDNN's flash kernels would refuse the call: before
  the default changed, such models ran, and they must still run."""
  bf16, f32 = jax.numpy.bfloat16, jax.numpy.float32
  q = jax.numpy.ones((1, 6, 2, {"head 12 (not a multiple of 8)": 12, "head 160 (above 128)": 160}.get(case, 64)),
                     f32 if case == "float32" else bf16)
  k = q if not case.startswith("one query") else jax.numpy.ones((1, 5, 2, 64), bf16)
  q = q[:, :1] if case.startswith("one query") else q
  asked = _asked_for(monkeypatch, q, k, gpu=True, ampere=not case.startswith("pre-ampere"))
  assert asked == [expected], (case, asked)


def test_target_platform_builds_for_a_platform_that_is_not_here(monkeypatch):
  """clip.TARGET_PLATFORM (ahead-of-time compilation, benchmarks/aot_report.py) decides what the process's own
  platform would: 'gpu' asks for cuDNN's attention without a GPU to ask, 'tpu' drops the CPU-only rewrites."""
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  asked = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, implementation=None, **kw: asked.append(implementation) or real(*a, **kw))
  monkeypatch.setattr(clip_lib, "ATTENTION_IMPLEMENTATION", "cudnn")
  q = jax.numpy.ones((1, 6, 2, 64), jax.numpy.bfloat16)
  assert clip_lib._on_cpu_by_default(None)  # pylint: disable=protected-access  # this process: the CPU
  clip_lib.attention(q, q, q)
  assert asked == []  # the CPU's written-out attention
  monkeypatch.setattr(clip_lib, "TARGET_PLATFORM", "gpu")
  clip_lib.attention(q, q, q)
  assert asked == ["cudnn"]
  monkeypatch.setattr(clip_lib, "TARGET_PLATFORM", "tpu")
  assert not clip_lib._on_cpu_by_default(None)  # pylint: disable=protected-access
  clip_lib.attention(q, q, q)
  assert asked == ["cudnn", None]  # XLA's own attention


@pytest.mark.parametrize("causal", [False, True])
def test_even_length_attention_is_exact(causal):
  """The odd-length padding used for cuDNN (whose backward takes even lengths), run here with XLA's kernel:
  outputs and input gradients equal plain attention over the odd length."""
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  q, k, v = (jax.numpy.asarray(rng.standard_normal((2, 129, 3, 16)), jax.numpy.float32) for _ in range(3))
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  padded = lambda q, k, v: clip_lib.even_length_attention(q, k, v, causal=causal)
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda *a: (f(*a) * jax.numpy.arange(16.0)).sum()
  for g_pad, g_plain in zip(jax.grad(loss(padded), (0, 1, 2))(q, k, v), jax.grad(loss(plain), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_pad, g_plain, rtol=1e-4, atol=1e-5)


def test_convert_refuses_a_stride_above_the_patch(vit_sd, tmp_path, capsys):
  """It converted, and the trainer refused the directory later ("model.stride: 20 is more than the CLIP's patch")."""
  src = tmp_path / "clip.npz"
  np.savez(src, **vit_sd)
  assert convert.main(["clip", str(src), str(tmp_path / "out"), "--input_size", "64", "32", "--stride", "20"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: {src}: --stride 20 is more than the CLIP's 16-pixel patch, which would skip pixels; "
                 "expected 1..16"] and not (tmp_path / "out").exists()


def test_state_dict_saved_from_data_parallel_converts(small, tmp_path, capsys):
  """A CLIP fine-tuned under (Distributed)DataParallel, or an open_clip training checkpoint, has every key under
  `module.`: `convert clip` refused it as "missing tensor 'ln_final.weight', not a CLIP state dict" (`convert
  clipreid` removed the prefix)."""
  _, _, sd = small
  plain, wrapped = tmp_path / "plain.pt", tmp_path / "dp.pt"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, plain)
  torch.save({"epoch": 3, "state_dict": {"module." + k: torch.from_numpy(v) for k, v in sd.items()}}, wrapped)
  assert convert.main(["clip", str(plain), str(tmp_path / "a")]) == 0
  assert convert.main(["clip", str(wrapped), str(tmp_path / "b")]) == 0, capsys.readouterr().err
  _, va = load_clip(tmp_path / "a")
  _, vb = load_clip(tmp_path / "b")
  for x, y in zip(jax.tree_util.tree_leaves(va), jax.tree_util.tree_leaves(vb)):
    np.testing.assert_array_equal(x, y)


def test_bfloat16_safetensors_read_as_the_same_pt(tmp_path):
  """bfloat16 weights (a CLIP saved with `.to(torch.bfloat16)`) converted from .pt but were refused from
  .safetensors ("unsupported dtype BF16"): both now read as the same float32 values."""
  from clipreid_jax.state_dicts import read_state_dict  # pylint: disable=g-import-not-at-top
  sd = {"a.weight": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).bfloat16(),
        "b": torch.tensor([1.0, -2.5e-3, 3e38]).bfloat16(), "n": torch.arange(3)}
  torch.save(sd, tmp_path / "w.pt")
  header, blobs, offset = {}, [], 0
  for k, v in sd.items():
    b = (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy().tobytes()
    header[k] = {"dtype": "BF16" if v.dtype == torch.bfloat16 else "I64", "shape": list(v.shape),
                 "data_offsets": [offset, offset + len(b)]}
    blobs.append(b)
    offset += len(b)
  h = json.dumps(header).encode()
  (tmp_path / "w.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))
  want, got = read_state_dict(tmp_path / "w.pt"), read_state_dict(tmp_path / "w.safetensors")
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
    np.testing.assert_array_equal(got[k], want[k])


def test_resize_at_conversion_equals_the_trainers_for_float16_weights(tmp_path):
  """OpenAI's weights are float16. `convert clip --input_size` resized the positional table and rounded it back to
  float16, while the trainer resizes the converted float32 table: the two documented ways differed by ~1e-4."""
  from clipreid_jax.models import clipreid  # pylint: disable=g-import-not-at-top
  sd = {k: torch.from_numpy(v).half() if v.dtype == np.float32 else torch.from_numpy(v)
        for k, v in state_dict_numpy(random_clip(3, **SMALL["vit"])).items()}
  torch.save(sd, tmp_path / "clip16.pt")
  assert convert.main(["clip", str(tmp_path / "clip16.pt"), str(tmp_path / "square")]) == 0
  assert convert.main(["clip", str(tmp_path / "clip16.pt"), str(tmp_path / "reid"), "--input_size", "64", "32"]) == 0
  tables = []
  for name in ("square", "reid"):
    cfg, variables = load_clip(tmp_path / name)
    _, reid = clipreid.from_clip(cfg.config, variables, num_classes=3, input_size=(64, 32))
    tables.append(np.asarray(reid["params"]["image_encoder"]["positional_embedding"]))
  np.testing.assert_array_equal(tables[0], tables[1])


def test_resnet_converted_for_the_reid_input_size_names_the_last_stride(tmp_path):
  """`convert clip RN50.pt --input_size 256 128` (as README said for that geometry) gives OpenAI's last-stride-2
  grid, which CLIP-ReID's ResNet (last stride 1) refuses; the refusal said to convert "with this input size and
  stride" -- what the user had done. It names --resnet_last_stride 1, with which the conversion fits."""
  from clipreid_jax.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models import clipreid  # pylint: disable=g-import-not-at-top
  sd = {k: torch.from_numpy(v) for k, v in state_dict_numpy(random_clip(3, **SMALL["resnet"])).items()}
  torch.save(sd, tmp_path / "rn.pt")
  assert convert.main(["clip", str(tmp_path / "rn.pt"), str(tmp_path / "s2"), "--input_size", "64", "32"]) == 0
  model, variables = load_clip(tmp_path / "s2")
  with pytest.raises(CheckpointError, match="--resnet_last_stride 1"):
    clipreid.from_clip(model.config, variables, num_classes=3, input_size=(64, 32))
  assert convert.main(["clip", str(tmp_path / "rn.pt"), str(tmp_path / "s1"), "--input_size", "64", "32",
                       "--resnet_last_stride", "1"]) == 0
  model, variables = load_clip(tmp_path / "s1")
  clipreid.from_clip(model.config, variables, num_classes=3, input_size=(64, 32))

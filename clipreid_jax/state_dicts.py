"""Reading PyTorch-world checkpoints safely into `{name: numpy array}`.

Formats: OpenAI's TorchScript archives (`ViT-B-16.pt`, `RN50.pt`, ...), plain `torch.save` state dicts
(.pt/.pth, optionally wrapped in {"state_dict": ...} or {"model": ...}), `.safetensors` and `.npz`; the `module.`
prefix of every key of a model saved from (Distributed)DataParallel is removed.

Security: plain pickles are read only with torch's `weights_only=True`, which refuses any object but
tensors and containers. A TorchScript archive holds code, so it is loaded only when its SHA-256
matches OpenAI's published hash for a known file name, or when the caller passes `trust=True`.
torch is imported lazily, only here, and only for .pt/.pth files.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import struct
import zipfile

import numpy as np

from clipreid_jax.checkpoints import CheckpointError
from clipreid_jax.data.errors import describe

# SHA-256 of OpenAI's CLIP archives, as published in their download URLs.
OPENAI_SHA256 = {
    "RN50.pt": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    "RN101.pt": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
    "RN50x4.pt": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
    "RN50x16.pt": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
    "RN50x64.pt": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
    "ViT-B-32.pt": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B-16.pt": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L-14.pt": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L-14-336px.pt": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
                       "BF16": np.uint16}  # bfloat16: the top half of a float32, widened on reading (as .pt files)


def sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _is_torchscript(path: pathlib.Path) -> bool:
  """TorchScript archives are zips with a `code/` folder; plain torch.save zips have none."""
  try:
    with zipfile.ZipFile(path) as z:
      # Entries are "<root>/..."; the root folder is named after the file, so look below it.
      return any(n.partition("/")[2].startswith("code/") for n in z.namelist())
  except zipfile.BadZipFile:
    return False


def _to_numpy(sd: dict, path: pathlib.Path) -> dict[str, np.ndarray]:
  import torch
  out = {}
  for k, v in sd.items():
    if not isinstance(k, str):
      raise CheckpointError(f"{path}: key {k!r} is not a string ({type(k).__name__}), expected tensor names; "
                            "not a plain state dict")
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    elif isinstance(v, (int, float)) and k in ("input_resolution", "context_length", "vocab_size"):
      continue  # OpenAI's non-tensor entries; build_model deletes them too
    else:
      raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor; not a plain state dict")
  return out


def _unwrap(obj, path: pathlib.Path) -> dict:
  if isinstance(obj, dict):
    for key in ("state_dict", "model"):
      if key in obj and isinstance(obj[key], dict):
        return obj[key]
    return obj
  raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict (a dict of tensors)")


def _read_torch(path: pathlib.Path, trust: bool) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path}: reading PyTorch files needs torch; pip install 'clipreid-jax[convert]'") from None
  if _is_torchscript(path):
    expected = OPENAI_SHA256.get(path.name)
    if expected is not None:
      got = sha256(path)
      if got != expected:
        raise CheckpointError(f"{path}: SHA-256 {got} does not match OpenAI's published {expected}; "
                              "the file is corrupt or not OpenAI's (an archive of your own: rename it and pass --trust)")
    elif not trust:
      raise CheckpointError(f"{path}: a TorchScript archive (it contains code) with an unknown name; "
                            "pass --trust to load it anyway, or convert a plain state dict")
    try:
      module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
      raise CheckpointError(f"{path}: cannot load TorchScript archive ({type(e).__name__})") from None
    return _to_numpy(dict(module.state_dict()), path)
  with open(path, "rb") as f:
    head = f.read(2)
  # torch.save writes a zip archive (a pickle before PyTorch 1.6: protocol 2 and up starts with 0x80); torch's own
  # errors for other bytes name an opcode or a byte, not the file's kind.
  if head != b"PK" and head[:1] != b"\x80":
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (its bytes are neither a torch.save archive nor a "
                          "pickle); expected a file written by torch.save, an OpenAI CLIP archive or an .npz")
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:
    # weights_only refuses a pickle that names a class or function ("Unsupported global: GLOBAL ..."); bytes that
    # are no pickle at all fail on their first opcode ("Unsupported operand"): a corrupt or foreign file.
    if "GLOBAL" in str(e) or "Unsupported global" in str(e):
      raise CheckpointError(f"{path}: not a plain state dict (it needs arbitrary code to unpickle); refusing to load") from None
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({describe(e, limit=160)}); expected a file "
                          "written by torch.save, an OpenAI CLIP archive or an .npz") from None
  return _to_numpy(_unwrap(obj, path), path)


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  data = path.read_bytes()
  if len(data) < 8:
    raise CheckpointError(f"{path}: truncated safetensors file ({len(data)} bytes)")
  (n,) = struct.unpack("<Q", data[:8])
  if 8 + n > len(data):
    raise CheckpointError(f"{path}: truncated or corrupt safetensors header (it claims {n} bytes, "
                          f"the file has {len(data)})")
  try:
    header = json.loads(data[8:8 + n])
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
    raise CheckpointError(f"{path}: not a safetensors file (bad header)") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")
  base, out = 8 + n, {}
  for k, info in header.items():
    if k == "__metadata__":
      continue
    if not isinstance(info, dict):
      raise CheckpointError(f"{path}: tensor {k!r} has a header entry that is a JSON {type(info).__name__}, "
                            "expected an object with dtype, shape and data_offsets")
    if info.get("dtype") not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: tensor {k!r} has unsupported dtype {info.get('dtype')}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
      raise CheckpointError(f"{path}: tensor {k!r} has shape {shape!r}, expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
      raise CheckpointError(f"{path}: tensor {k!r} has data_offsets {offsets!r}, expected [start, end] with "
                            "0 <= start <= end")
    start, end = offsets
    if base + end > len(data):
      raise CheckpointError(f"{path}: truncated (tensor {k!r} ends past the end of the file)")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    if end - start != math.prod(shape) * dtype.itemsize:
      raise CheckpointError(f"{path}: tensor {k!r} has {end - start} bytes, but shape {tuple(shape)} of "
                            f"{info['dtype']} needs {math.prod(shape) * dtype.itemsize}")
    out[k] = np.frombuffer(data[base + start:base + end], dtype=dtype).reshape(shape).copy()
    if info["dtype"] == "BF16":
      out[k] = (out[k].astype(np.uint32) << 16).view(np.float32)
  return out


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:
    raise CheckpointError(f"{path}: not a readable .npz ({type(e).__name__})") from None


def read_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into {name: array}; raises CheckpointError naming the file on any problem."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such file")
  if path.stat().st_size == 0:
    raise CheckpointError(f"{path}: empty file")
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    sd = _read_safetensors(path)
  elif suffix == ".npz":
    sd = _read_npz(path)
  elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
    sd = _read_torch(path, trust)
  else:
    raise CheckpointError(f"{path}: unknown checkpoint extension {suffix!r}; expected .pt, .pth, .safetensors or .npz")
  if not sd:
    raise CheckpointError(f"{path}: holds no tensors")
  if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DistributedDataParallel (or open_clip)
    sd = {k[len("module."):]: v for k, v in sd.items()}
  # A diverged or corrupt checkpoint converts silently otherwise, and every feature of the model is NaN.
  bad = [k for k, v in sd.items() if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]
  if bad:
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    raise CheckpointError(f"{path}: tensor {bad[0]!r}{more} holds NaN or infinite values; expected finite weights (a "
                          "diverged or corrupt checkpoint)")
  return sd

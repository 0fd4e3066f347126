"""What JAX's backend alone costs in host memory (RSS), under environment settings that might change it.

    python benchmarks/runtime_memory.py                      # every setting below, each in its own process
    python benchmarks/runtime_memory.py --settings default,lazy

The evaluation's peak-RSS goal (3 GB, issue 6) sits on top of this floor: on the H100 machine JAX's CUDA backend
held 2.70 GB (2.24 GB anonymous) before any evaluation. On an H200 this script found it to be JAX's reservation of
the GPU's memory (4.2 GB with it, 0.7 GB with `noprealloc`), which eval and extract modes now turn off
(docs/evaluation.md). Each setting runs a fresh process that reports RSS
(anonymous / file-backed) after `import jax`, after the backend starts (`jax.devices()`), after one tiny op, after
one jitted 2048^2 float32 product (cuBLAS loaded) and after one jitted product compiled without autotuning (as the
evaluation's are, `metrics.jit_untuned`), plus the largest resident mappings and the CUDA / XLA environment.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # pylint: disable=g-import-not-at-top,wrong-import-position

SETTINGS = {  # name -> environment overrides
    "default": {},
    "lazy": {"CUDA_MODULE_LOADING": "LAZY"},
    "eager": {"CUDA_MODULE_LOADING": "EAGER"},
    "noprealloc": {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
    "lazy+noprealloc": {"CUDA_MODULE_LOADING": "LAZY", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
    "platform_alloc": {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"},
    "cpu": {"JAX_PLATFORMS": "cpu"},
}


def worker() -> dict:
  points = {"python": C.rss_gb()}  # Python and numpy (benchmarks/_common.py)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  points["import jax"] = C.rss_gb()
  devices = jax.devices()
  points["backend"] = C.rss_gb()
  jnp.zeros(1).block_until_ready()
  points["tiny op"] = C.rss_gb()
  x = jnp.ones((2048, 2048), jnp.float32)
  jax.jit(lambda a: a @ a)(x).block_until_ready()
  points["matmul"] = C.rss_gb()
  jax.jit(lambda a: a @ a.T, compiler_options={"xla_gpu_autotune_level": 0} if devices[0].platform == "gpu"
          else None)(x).block_until_ready()
  points["untuned matmul"] = C.rss_gb()
  env = {k: v for k, v in os.environ.items() if k.startswith(("CUDA_", "XLA_", "TF_", "NVIDIA_", "JAX_"))}
  return dict(device=f"{devices[0].device_kind} ({devices[0].platform})", jax=jax.__version__, points=points,
              top_mappings=C.top_mappings(10), env=env)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {list(SETTINGS)}")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--json", help="write every setting's result here")
  args = p.parse_args(argv)
  if args.worker:
    print("RESULT " + json.dumps(worker()), flush=True)
    return 0
  results = {}
  for name in args.settings.split(","):
    env = dict(os.environ, **SETTINGS[name])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if lines:
      r = results[name] = json.loads(lines[-1][len("RESULT "):])
    else:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
      r = results[name] = {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    if args.json:  # after every setting: a part cut by its timeout keeps the settings that finished
      with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    if "error" in r:
      print(f"{name}: ERROR {r['error']}", flush=True)
      continue
    print(f"\n== {name} ({', '.join(f'{k}={v}' for k, v in SETTINGS[name].items()) or 'environment as is'}) on "
          f"{r['device']}, jax {r['jax']}", flush=True)
    print(f"   {'point':<16}{'RSS GB':>8}{'anon':>8}{'file':>8}{'peak':>8}")
    for point, m in r["points"].items():
      print(f"   {point:<16}{m.get('VmRSS', 0):>8.2f}{m.get('RssAnon', 0):>8.2f}{m.get('RssFile', 0):>8.2f}"
            f"{m.get('VmHWM', 0):>8.2f}")
    print("   largest mappings GB: " + ", ".join(f"{n} {v:.2f}" for n, v in r["top_mappings"]))
    print("   environment: " + (", ".join(f"{k}={v}" for k, v in sorted(r["env"].items())) or "none of CUDA_/XLA_/"
                                "TF_/NVIDIA_/JAX_"), flush=True)
  ok = {k: v for k, v in results.items() if "error" not in v}
  if ok:
    print("\nsetting          RSS after the untuned product (GB)")
    for k, v in ok.items():
      print(f"{k:<17}{v['points']['untuned matmul']['VmRSS']:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Evaluation benchmark at MSMT17 size: chunked on-device `evaluate` vs the official full-matrix NumPy algorithm.

Synthetic features with MSMT17's test shape (11,659 queries x 82,161 gallery, 1280-d, 3,060 identities seen by
2-6 of 15 cameras; feature = identity centre + camera offset + per-image noise, heavy-tailed images per
identity). Each contender runs in its own subprocess, so peak RSS (VmHWM) is its own:

- ours: `clipreid_jax.evaluation.evaluate` on the default JAX device;
- reference: NumPy on the CPU, the official algorithm (normalise, full fp32 distance matrix, argsort with numpy's
  default kind, per-query filter / CMC / AP: `metrics.eval_func(stable=False)`);
- re-ranking: `evaluate_reranked` (scalable k-reciprocal re-ranking, k1=50, k2=15, lambda=0.3) + evaluation.

Wall times cover the call (normalisation, transfers, compilation included), not the data loading or JAX start-up.

  python benchmarks/eval_benchmark.py --warm --autotune-off-too --same-dist-check   # full size (reference ~20 GB)
  python benchmarks/eval_benchmark.py --scale 0.1                                   # quick check

--warm also times a second (compiled) call of ours; --autotune-off-too reruns ours with XLA's GEMM autotuning off
(most of a first call's time on GPU); --same-dist-check runs our ranking on the reference's own matrix (untimed).
The output ends with one line per goal: `goal NAME: measured X target Y met|not met`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # pylint: disable=g-import-not-at-top,wrong-import-position

# MSMT17 test split.
NUM_QUERY, NUM_GALLERY, NUM_IDS, NUM_CAMS, DIM = 11_659, 82_161, 3_060, 15, 1280
GOAL_SPEEDUP, GOAL_RSS_GB, GOAL_RERANK_RSS_GB, GOAL_METRIC_DIFF = 10.0, 3.0, 8.0, 1e-6
# Independent fp32 GEMMs round differently; a near-tie can swap a match and a non-match (1 query = 1/11,649).
GOAL_CROSS_MAP, GOAL_CROSS_CMC = 1e-5, 2e-4


def make_synthetic(scale: float, dim: int = DIM, seed: int = 0, noise: float = 2.8, cam: float = 0.5):
  """MSMT17-shaped features and labels; `scale` multiplies the image and identity counts."""
  rng = np.random.default_rng(seed)
  n_ids = max(int(round(NUM_IDS * scale)), 2)
  nq, ng = max(int(round(NUM_QUERY * scale)), n_ids), max(int(round(NUM_GALLERY * scale)), n_ids)
  popularity = rng.lognormal(0.0, 0.8, n_ids)  # heavy-tailed images per identity, at least one each

  def counts(total):
    return 1 + rng.multinomial(total - n_ids, popularity / popularity.sum())

  centres = rng.standard_normal((n_ids, dim), dtype=np.float32)
  offsets = cam * rng.standard_normal((NUM_CAMS, dim), dtype=np.float32)
  cams_seen = rng.integers(2, 7, n_ids)  # each identity walks past 2-6 cameras
  cam_order = np.argsort(rng.random((n_ids, NUM_CAMS)), axis=1)
  hardness = rng.uniform(0.8, 1.2, n_ids).astype(np.float32)  # some identities are harder

  def draw(total):
    pids = rng.permutation(np.repeat(np.arange(n_ids), counts(total)))
    camids = cam_order[pids, (rng.random(pids.size) * cams_seen[pids]).astype(np.int64)]
    feats = np.empty((pids.size, dim), np.float32)
    for lo in range(0, pids.size, 8192):  # chunks keep float temporaries small
      p, c = pids[lo:lo + 8192], camids[lo:lo + 8192]
      feats[lo:lo + 8192] = centres[p] + offsets[c] + (noise * hardness[p])[:, None] * rng.standard_normal(
          (p.size, dim), dtype=np.float32)
    return feats, pids, camids

  qf, q_pids, q_camids = draw(nq)
  gf, g_pids, g_camids = draw(ng)
  return dict(qf=qf, gf=gf, q_pids=q_pids, g_pids=g_pids, q_camids=q_camids, g_camids=g_camids)


def _peak_rss_gb() -> float:
  """This process's peak RSS: /proc's VmHWM (ru_maxrss would carry the parent's peak across fork + exec, and the
  parent held the generated data)."""
  hwm = C.rss_gb().get("VmHWM")
  return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _load(data_dir):
  return {k: np.load(os.path.join(data_dir, f"{k}.npy"))
          for k in ("qf", "gf", "q_pids", "g_pids", "q_camids", "g_camids")}


def _labels(d):
  return d["q_pids"], d["g_pids"], d["q_camids"], d["g_camids"]


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
  except OSError:
    pass
  return f"{platform.processor() or 'cpu'} x{os.cpu_count()}"


def _jax_device() -> str:
  import jax
  dev = jax.devices()[0]
  jax.numpy.zeros(1).block_until_ready()  # backend start-up is not timed
  name = _cpu_name() if dev.platform == "cpu" else dev.device_kind
  return f"{name} (jax {dev.platform}, {jax.device_count()} device(s))"


def _summary(res) -> dict:
  return dict(mAP=res.mAP, mINP=res.mINP, cmc=[float(c) for c in res.cmc], num_valid=res.num_valid_queries)


def _load_to_device(data_dir: str) -> dict:
  """Features straight into device memory in 8,192-row pieces (as a model's features are produced there), labels
  on the host: the host never holds a whole feature matrix."""
  import jax
  import jax.numpy as jnp
  d = {}
  for k in ("qf", "gf"):
    with open(os.path.join(data_dir, f"{k}.npy"), "rb") as f:
      major, _ = np.lib.format.read_magic(f)
      read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
      shape, _, dtype = read_header(f)
      parts = []
      for lo in range(0, shape[0], 8192):
        rows = min(8192, shape[0] - lo)
        parts.append(jax.device_put(np.fromfile(f, dtype, rows * shape[1]).reshape(rows, shape[1])))
      d[k] = jnp.concatenate(parts)
      d[k].block_until_ready()
  d.update({k: np.load(os.path.join(data_dir, f"{k}.npy")) for k in ("q_pids", "g_pids", "q_camids", "g_camids")})
  return d


def worker_ours(data_dir: str, args) -> dict:
  rss = {"start": C.rss_gb()}
  from clipreid_jax import host_memory
  if not args.preallocate:
    host_memory.no_device_preallocation()  # as eval mode does (main.py), before the backend starts
  from clipreid_jax.evaluation import evaluate
  device = _jax_device()
  rss["runtime"] = C.rss_gb()  # JAX + the backend started
  d = _load_to_device(data_dir) if args.device_features else _load(data_dir)
  rss["loaded"] = C.rss_gb()
  floor = _peak_rss_gb()  # JAX runtime + the loaded features, before evaluating
  t0 = time.perf_counter()
  res = evaluate(d["qf"], d["gf"], *_labels(d), chunk=args.chunk, ranking=args.ranking)
  wall = time.perf_counter() - t0
  rss["evaluated"] = C.rss_gb()
  out = dict(wall_s=wall, device=device, rss_before_gb=floor, rss=rss, top_mappings=C.top_mappings(),
             preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"), **_summary(res))
  if args.warm:
    t0 = time.perf_counter()
    evaluate(d["qf"], d["gf"], *_labels(d), chunk=args.chunk, ranking=args.ranking)
    out["warm_wall_s"] = time.perf_counter() - t0
  return out


def worker_reference(data_dir: str, args) -> dict:
  from clipreid_jax.evaluation.metrics import eval_func
  d = _load(data_dir)
  t0 = time.perf_counter()
  q, g = d["qf"], d["gf"]
  q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), np.float32(1e-12))
  g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), np.float32(1e-12))
  # Official: distmat = |q|^2 + |g|^2, then addmm(-2 q g^T); blocks only avoid a second full-size temporary.
  dist = np.add.outer(np.sum(q * q, 1), np.sum(g * g, 1))
  for lo in range(0, q.shape[0], 2048):
    dist[lo:lo + 2048] -= np.float32(2) * (q[lo:lo + 2048] @ g.T)
  res = eval_func(dist, *_labels(d), stable=False)
  wall = time.perf_counter() - t0
  out = dict(wall_s=wall, device=f"{_cpu_name()} (numpy {np.__version__})", **_summary(res))
  out["peak_rss_gb"] = _peak_rss_gb()  # before the untimed check below
  if args.same_dist_check:
    # Untimed: our chunked ranking (host path) on this very matrix; only exact-tie order may differ.
    from clipreid_jax.evaluation.metrics import evaluate_distmat
    same = evaluate_distmat(dist, *_labels(d), ranking="host")
    out["same_dist"] = dict(d_map=abs(same.mAP - res.mAP), d_cmc=float(np.max(np.abs(same.cmc - res.cmc))),
                            d_valid=same.num_valid_queries - res.num_valid_queries)
  return out


def worker_rerank(data_dir: str, args) -> dict:
  import jax.numpy as jnp
  from clipreid_jax.evaluation import l2_normalize, re_ranking
  from clipreid_jax.evaluation.metrics import evaluate_rows
  device = _jax_device()
  d = _load(data_dir)
  t0 = time.perf_counter()
  q, g = l2_normalize(d["qf"]), l2_normalize(d["gf"])
  rr = re_ranking(q, g, k1=args.k1, k2=args.k2, lambda_value=args.lam)
  jnp.zeros(1).block_until_ready()
  t_build = time.perf_counter() - t0
  res = evaluate_rows(rr.rows, rr.num_gallery, *_labels(d), chunk=256)
  wall = time.perf_counter() - t0
  return dict(wall_s=wall, build_s=t_build, device=device, nnz_vqe=rr.nnz(), **_summary(res))


WORKERS = {"ours": worker_ours, "reference": worker_reference, "rerank": worker_rerank}


def _run_worker(name: str, data_dir: str, args, xla_flags: str = "", device_features: bool = False,
                ranking: str = "auto", extra_env: dict | None = None, label: str | None = None,
                preallocate: bool = False) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--data", data_dir, "--k1", str(args.k1),
         "--k2", str(args.k2), "--lam", str(args.lam), "--ranking", ranking]
  if args.same_dist_check:
    cmd += ["--same-dist-check"]
  if args.chunk:
    cmd += ["--chunk", str(args.chunk)]
  if args.warm:
    cmd += ["--warm"]
  if device_features:
    cmd += ["--device-features"]
  if preallocate:
    cmd += ["--preallocate"]
  env = dict(os.environ)
  if name == "reference":
    env["JAX_PLATFORMS"] = "cpu"  # numpy only; never touch the accelerator
  if xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  env.update(extra_env or {})
  label = label or name
  print(f"[{time.strftime('%H:%M:%S')}] running {label} ...", flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    return {"error": f"{name} failed with exit code {proc.returncode}"}
  out = json.loads(lines[-1][len("RESULT "):])
  print(f"  {label}: {out['wall_s']:.2f} s, peak RSS {out['peak_rss_gb']:.2f} GB, mAP {out['mAP']:.6f}", flush=True)
  if "rss" in out:  # where the resident memory is: after start-up, loading and evaluating (GB)
    print("    RSS GB: " + "; ".join(f"{k}: " + ", ".join(f"{n} {v:.2f}" for n, v in r.items())
                                     for k, r in out["rss"].items()), flush=True)
    print("    largest mappings GB: " + ", ".join(f"{n} {v:.2f}" for n, v in out["top_mappings"])
          + f"; XLA_PYTHON_CLIENT_PREALLOCATE={out.get('preallocate')}", flush=True)
  return out


def _goal(name: str, measured: str, target: str, met: bool) -> str:
  return f"goal {name}: measured {measured} target {target} {'met' if met else 'not met'}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--scale", type=float, default=1.0, help="fraction of MSMT17's image / identity counts")
  p.add_argument("--dim", type=int, default=DIM)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--chunk", type=int, default=None, help="queries per device call (default: automatic)")
  p.add_argument("--skip-reference", action="store_true")
  p.add_argument("--skip-rerank", action="store_true")
  p.add_argument("--warm", action="store_true", help="also time a second, compiled call of ours")
  p.add_argument("--autotune-off-too", action="store_true",
                 help="also run ours with XLA_FLAGS=--xla_gpu_autotune_level=0 (GPU: less compile time)")
  p.add_argument("--device-features-too", action="store_true",
                 help="also run ours with the features loaded straight into device memory (as a model produces them)")
  p.add_argument("--device-features", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--ranking", default="auto", help=argparse.SUPPRESS)
  p.add_argument("--preallocate-too", action="store_true",
                 help="also run ours with JAX's GPU memory reservation (75%% of the device at start-up), which eval "
                      "mode turns off: the driver's host memory for it is the difference")
  p.add_argument("--preallocate", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--one-arena-too", action="store_true",
                 help="also run ours with one glibc malloc arena (GLIBC_TUNABLES=glibc.malloc.arena_max=1): whether "
                      "per-thread arenas holding freed memory make part of the GPU runtime's host memory")
  p.add_argument("--rankings-too", default="", help="also run ours with these ranking methods (e.g. 'sort,host')")
  p.add_argument("--case", choices=["msmt17", "gaussian"], default="msmt17",
                 help="msmt17: the structured features above; gaussian: isotropic random features and labels drawn "
                      "as recipe_benchmark.py draws them (many matches per query, a case where the GPU's "
                      "compare-and-count ranking was slow, docs/evaluation.md)")
  p.add_argument("--same-dist-check", action="store_true",
                 help="reference worker also runs our ranking on its own distance matrix (untimed)")
  p.add_argument("--k1", type=int, default=50)
  p.add_argument("--k2", type=int, default=15)
  p.add_argument("--lam", type=float, default=0.3)
  p.add_argument("--json", default=None, help="write all results to this file")
  p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  p.add_argument("--data", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.worker:
    out = WORKERS[args.worker](args.data, args)
    out.setdefault("peak_rss_gb", _peak_rss_gb())
    print("RESULT " + json.dumps(out), flush=True)
    return 0

  with tempfile.TemporaryDirectory(prefix="eval_bench_") as tmp:
    t0 = time.perf_counter()
    data = make_synthetic(args.scale, args.dim, args.seed) if args.case == "msmt17" else C.gaussian_eval_case(
        args.scale, args.dim, args.seed)
    for k, v in data.items():
      np.save(os.path.join(tmp, f"{k}.npy"), v)
    shape = (f"{data['qf'].shape[0]:,} queries x {data['gf'].shape[0]:,} gallery x {args.dim}-d, "
             f"{len(np.unique(data['g_pids'])):,} ids, {NUM_CAMS} cameras")
    del data
    print(f"data: {shape} (generated in {time.perf_counter() - t0:.1f} s)", flush=True)
    # The goal pair first, so a cut (SIGTERM from a time limit) loses only the extras; the table shows what ran.
    runs = [("ours", {})]
    runs += [] if args.skip_reference else [("reference", {})]
    runs += [("ours_noautotune", dict(xla_flags="--xla_gpu_autotune_level=0"))] if args.autotune_off_too else []
    runs += [("ours_device_features", dict(device_features=True))] if args.device_features_too else []
    runs += [("ours_preallocate", dict(preallocate=True))] if args.preallocate_too else []
    runs += ([("ours_one_arena", dict(extra_env={"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}))]
             if args.one_arena_too else [])
    runs += [(f"ours_ranking_{r}", dict(ranking=r)) for r in filter(None, args.rankings_too.split(","))]
    runs += [] if args.skip_rerank else [("rerank", {})]
    results, cut = {}, False
    C.cut_on_sigterm()
    try:
      for key, kw in runs:
        results[key] = _run_worker(key if key in WORKERS else "ours", tmp, args, label=key, **kw)
    except C.Cut:
      cut = True
      print(f"stopped by SIGTERM: not run: {', '.join(k for k, _ in runs if k not in results)}", flush=True)

  print()
  print(f"scale {args.scale}: {shape}")
  rows = [("ours: evaluate", "ours"), ("ours: evaluate, XLA_FLAGS=--xla_gpu_autotune_level=0", "ours_noautotune"),
          ("ours: evaluate, features already in device memory", "ours_device_features"),
          ("ours: evaluate, JAX's GPU memory reservation kept", "ours_preallocate"),
          ("ours: evaluate, one malloc arena", "ours_one_arena"),
          ("reference: numpy eval_func", "reference"),
          *[(f"ours: evaluate, ranking={r}", f"ours_ranking_{r}") for r in filter(None, args.rankings_too.split(","))],
          (f"ours: re-ranking k1={args.k1} k2={args.k2} lambda={args.lam} + evaluate", "rerank")]
  dw = max([len(r.get("device", "")) for r in results.values()] + [6])
  print(f"| {'run':<58} | {'device':<{dw}} | {'wall s':>8} | {'peak RSS GB':>11} | {'mAP':>8} | {'R1':>7} |"
        f" {'R5':>7} | {'mINP':>8} |")
  print(f"|{'-' * 60}|{'-' * (dw + 2)}|{'-' * 10}|{'-' * 13}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 10}|")
  for label, key in rows:
    r = results.get(key)
    if r is None:
      continue
    if "error" in r:
      print(f"| {label:<58} | {r['error']}")
      continue
    cmc = r["cmc"]
    print(f"| {label:<58} | {r['device']:<{dw}} | {r['wall_s']:>8.2f} | {r['peak_rss_gb']:>11.2f} |"
          f" {r['mAP']:>8.5f} | {cmc[0]:>7.4f} | {cmc[min(4, len(cmc) - 1)]:>7.4f} | {r['mINP']:>8.5f} |")
  ours, ref, rr = results.get("ours", {"error": "not run"}), results.get("reference"), results.get("rerank")
  for key in [k for k in results if k.startswith("ours")]:
    r = results.get(key, {})
    if "warm_wall_s" in r:
      print(f"{key}: second (compiled) call {r['warm_wall_s']:.2f} s; RSS before evaluating (runtime + loaded "
            f"features) {r['rss_before_gb']:.2f} GB")
  if rr and "error" not in rr:
    print(f"re-ranking: build {rr['build_s']:.1f} s, then evaluation {rr['wall_s'] - rr['build_s']:.1f} s; "
          f"V_qe non-zeros {rr['nnz_vqe']:,}")
  goals = []
  if "error" not in ours:
    goals.append(_goal("ours_peak_rss", f"{ours['peak_rss_gb']:.2f} GB", f"<= {GOAL_RSS_GB:g} GB",
                       ours["peak_rss_gb"] <= GOAL_RSS_GB))
  else:
    goals.append(f"goal ours_peak_rss: not measured ({ours['error']})")
  if not ref or "error" in ref or "error" in ours:
    goals.insert(0, "goal speedup_vs_reference: not measured (" + ("--skip-reference" if args.skip_reference else
                 (ours.get("error") or (ref or {}).get("error") or "reference not run")) + ")")
  if ref and "error" not in ref and "error" not in ours:
    speedup = ref["wall_s"] / ours["wall_s"]
    d_map = abs(ref["mAP"] - ours["mAP"])
    d_cmc = float(np.max(np.abs(np.asarray(ref["cmc"]) - np.asarray(ours["cmc"]))))
    print(f"ours vs reference (independent fp32 distances: {ours['device']} vs numpy): |dmAP| = {d_map:.2e}, "
          f"max |dCMC| = {d_cmc:.2e}, valid queries {ours['num_valid']} vs {ref['num_valid']}")
    goals.insert(0, _goal("speedup_vs_reference", f"{speedup:.1f}x (warm {ref['wall_s'] / ours['warm_wall_s']:.0f}x)"
                          if "warm_wall_s" in ours else f"{speedup:.1f}x", f">= {GOAL_SPEEDUP:g}x",
                          speedup >= GOAL_SPEEDUP))
    goals.append(_goal("metrics_vs_reference", f"|dmAP| {d_map:.1e}, max |dCMC| {d_cmc:.1e}",
                       f"|dmAP| <= {GOAL_CROSS_MAP:g}, max |dCMC| <= {GOAL_CROSS_CMC:g} (fp32 near-ties)",
                       d_map <= GOAL_CROSS_MAP and d_cmc <= GOAL_CROSS_CMC and ours["num_valid"] == ref["num_valid"]))
    if "same_dist" in ref:
      sd = ref["same_dist"]
      goals.append(_goal("same_metrics_same_distances", f"|dmAP| {sd['d_map']:.1e}, max |dCMC| {sd['d_cmc']:.1e}",
                         f"<= {GOAL_METRIC_DIFF:g}", max(sd["d_map"], sd["d_cmc"]) <= GOAL_METRIC_DIFF
                         and sd["d_valid"] == 0))
  if rr and "error" not in rr:
    goals.append(_goal("rerank_peak_rss", f"{rr['peak_rss_gb']:.2f} GB", f"<= {GOAL_RERANK_RSS_GB:g} GB",
                       rr["peak_rss_gb"] <= GOAL_RERANK_RSS_GB))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(scale=args.scale, shape=shape, results=results, goals=goals), f, indent=1)
  print("\n".join(goals))
  return 143 if cut else 0


if __name__ == "__main__":
  sys.exit(main())

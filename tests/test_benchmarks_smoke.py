"""The benchmark scripts run (their quick forms from the docs) and end with their goal lines.

Benchmarks measure; tests never time anything. This only keeps the scripts working between the runs that
fill docs/performance.md, docs/evaluation.md and docs/data.md.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

QUICK = {
    "eval": ["benchmarks/eval_benchmark.py", "--scale", "0.1"],  # docs/evaluation.md "quick check"
    "recipe": ["benchmarks/recipe_benchmark.py", "--tiny", "--scale", "0.001", "--eval_scale", "0.05"],
    "data": ["benchmarks/data_benchmark.py", "--seconds", "1", "--skip-workers"],
    "steps": ["benchmarks/step_benchmark.py", "--list"],
}


_GOAL_LINE = re.compile(r"goal (\w+): (measured .+ target .+? (met|not met)|not measured \(.+\))")
_GOALS_ON_RESULTS = {"metrics_vs_reference", "same_metrics_same_distances"}


@pytest.mark.parametrize("name", sorted(QUICK))
def test_benchmark_runs(name):
  out = subprocess.run([sys.executable, *QUICK[name]], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  if name == "steps":
    assert any("stage 2 ViT-B/16" in l for l in lines)
  else:
    goals = [l for l in lines if l.startswith("goal ")]
    # Each goal line is well formed ("not met" contains " met": a substring check passed anything). Only the goals on
    # results must be met here; speed and memory are the benchmark's to judge, not a loaded test machine's.
    parsed = [_GOAL_LINE.fullmatch(l) for l in goals]
    assert goals and all(parsed), goals
    assert all(m[3] == "met" for m in parsed if m[1] in _GOALS_ON_RESULTS), goals


def test_dispatch_benchmark_compares_both_forms(tmp_path):
  """The host rows of both call forms, with and without gc.freeze(), and the comparison line (no step compiled)."""
  out = subprocess.run([sys.executable, "benchmarks/dispatch_benchmark.py", "--real_steps", "0", "--calls", "20",
                        "--json", str(tmp_path / "rows.json")], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "631 state arrays" in out.stdout  # the full-size ViT-B/16 state and its optimizer's
  rows = json.loads((tmp_path / "rows.json").read_text())
  assert [r["form"] for r in rows] == ["pytree", "leaves", "pytree+freeze", "leaves+freeze"]
  assert all(r["host_us"] > 0 for r in rows)
  assert re.search(r"^leaves/pytree host time: [0-9.]+x", out.stdout, re.M), out.stdout[-500:]


def test_our_step_rows_run_as_the_trainer_calls_them(tmp_path):
  """The GPU session's tools, on the CPU at their smallest: step_benchmark.py's ViT-B/16 stage-2 row and one
  profile_step.py variant, both through steps.loop_step (a broken worker would cost a GPU session its budget)."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, "benchmarks/step_benchmark.py", "--frameworks", "jax", "--backbones", "vit",
                        "--no_stage1", "--no-olp", "--iters", "1", "--warmup", "0", "--pipelined", "1", "--json",
                        str(tmp_path / "step.json")], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  (row,) = json.loads((tmp_path / "step.json").read_text())
  r = row["result"]
  assert "error" not in r and r["median_s"] > 0 and r["pipelined_s"] > 0 and np.isfinite(r["first_loss"]), r
  out = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--batch", "8", "--steps", "1", "--variants",
                        "default", "--profile_steps", "1", "--trace_dir", str(tmp_path / "trace"), "--json",
                        str(tmp_path / "profile.json")], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  (variant,) = json.loads((tmp_path / "profile.json").read_text())
  assert variant["variant"] == "default" and variant["dispatch_ms"] > 0 and np.isfinite(variant["loss"]), variant
  assert "profile_error" not in variant and variant["components"], variant


def test_profile_step_reads_a_real_trace(tmp_path):
  """profile_step.py's trace reader on a jax.profiler trace taken here (CPU: XLA's thunks on host threads) and
  its HLO lookup, which names what a kernel computes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO / "benchmarks"))
  import profile_step  # pylint: disable=g-import-not-at-top

  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0) * 2.0 + x.sum(0))
  x = jnp.ones((256, 256))
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(2):
      f(x).block_until_ready()
  summary = profile_step.summarize(profile_step.load_trace(str(tmp_path)), steps=2)
  assert summary["threads"] and summary["top_ops"]
  assert all(r["ms_per_step"] >= 0 for r in summary["top_ops"])
  hlo = f.lower(x).compile().as_text()
  fused = [r["name"] for r in summary["top_ops"] if "fusion" in r["name"]]
  assert fused, summary["top_ops"]
  explained = profile_step.explain(hlo, fused)
  assert explained and all("op_name=" in v for v in explained.values()), explained
  spans = [sp for sp in profile_step.load_trace(str(tmp_path)) if sp.hlo_op]
  parts = profile_step.by_component(spans, hlo, steps=2)
  assert parts and "unmapped" not in parts, parts  # every timed thunk found its instruction's op path
  # A GPU kernel inside a CUDA graph carries the graph's thunk as its HLO op: XLA's kernels are found by their name.
  Span = profile_step.Span  # pylint: disable=invalid-name
  numbered = [n for n in fused if re.search(r"\.\d+$", n)]  # fusion.12 (the CPU's ynn_fusion has no number)
  assert numbered, fused
  name = re.sub(r"\.(\d+)$", r"_\1", numbered[0])  # as XLA:GPU names the kernel of fusion.12: fusion_12
  graph = [Span("/device:GPU:0", "Stream #14", name, 0.0, 1000.0, "command_buffer.3"),
           Span("/device:GPU:0", "Stream #14", "nvjet_sm90_tst", 0.0, 500.0, "command_buffer.3")]
  parts = profile_step.by_component(graph, hlo, steps=1)
  assert parts["unmapped"] == 0.5 and parts["unmapped ops"] == {"command_buffer.3": 0.5}, parts
  assert sum(v for k, v in parts.items() if k not in ("unmapped", "unmapped ops")) == 1.0, parts
  assert profile_step.component("jit(step)/transpose(jvp(CLIPReID))/x/resblocks_3/attn/in_proj/dot_general") == (
      "backward attn/in_proj")
  assert profile_step.component("jit(step)/jvp(CLIPReID)/x/while/body/closed_call/ResidualAttentionBlock/mlp/mul") == (
      "forward mlp")
  assert profile_step.category("nvjet_sm90_tst_128x128") == "matmul"
  assert profile_step.category("input_transpose_fusion_22") == "copy"


def test_largest_fusion_counts_array_parameters_only():
  """The gradient norm's final sum takes one scalar per parameter (156 for ViT-B/16); it re-computes nothing, so
  it must not pass for the residual-gradient chain the barriers bound."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  import profile_step  # pylint: disable=g-import-not-at-top
  scalars = ", ".join(f"param_{i}.1: f32[]" for i in range(156))
  hlo = (f"%fused_computation.7 ({scalars}) -> f32[] {{\n  ROOT %a = f32[] add(%param_0.1, %param_1.1)\n}}\n"
         "%fused_computation.8 (param_0.2: f32[8,129,768], param_1.2: f32[768], param_2.2: f32[], "
         "param_3.2: bf16[2,3]) -> f32[8,129,768] {\n  ROOT %b = f32[8,129,768] copy(%param_0.2)\n}\n"
         "%region_1.3 (x: f32[4], y: f32[4], z: f32[4], w: f32[4]) -> f32[4] {\n}\n")
  assert profile_step.largest_fusion(hlo) == 3


def test_step_benchmark_pools_the_rounds_of_a_row():
  """--rounds: a row's time is the median of every step of every round; a failed round is left out."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  import step_benchmark  # pylint: disable=g-import-not-at-top
  rounds = [dict(median_s=2.0, times=[1.0, 2.0, 9.0], pipelined_s=None, load=[1.0, 1.5]), {"error": "timed out"},
            dict(median_s=4.0, times=[3.0, 4.0, 5.0], pipelined_s=None, load=[2.0, 2.5])]
  merged = step_benchmark.merge_rounds(rounds)
  assert merged["median_s"] == 3.5 and merged["round_medians"] == [2.0, 4.0] and merged["load"] == [1.0, 2.5]
  assert step_benchmark.merge_rounds(rounds[:1]) is rounds[0]
  assert "error" in step_benchmark.merge_rounds([{"error": "x"}, {"error": "y"}])


def test_recipe_counts_background_saves():
  """A save costs the loop its blocking part, plus the write the training between saves does not cover; the last
  save of a stage costs its whole write (the trainer waits for it at the stage's end)."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  import recipe_benchmark  # pylint: disable=g-import-not-at-top
  assert recipe_benchmark.checkpoint_cost_s(3, blocking=0.2, written=2.0, between_s=10.0) == pytest.approx(2.4)
  assert recipe_benchmark.checkpoint_cost_s(3, blocking=0.2, written=2.0, between_s=1.0) == pytest.approx(4.0)
  assert recipe_benchmark.checkpoint_cost_s(1, blocking=0.2, written=2.0, between_s=1.0) == pytest.approx(2.0)


def test_eval_benchmark_cut_by_sigterm_prints_what_it_measured():
  """gpu_all.sh runs each part under `timeout`: SIGTERM mid-run must still print the table and the goal lines of
  what finished (the goal pair runs first), and exit 143."""
  import signal  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, "benchmarks/eval_benchmark.py", "--scale", "0.05", "--skip-rerank", "--device-features-too",
         "--one-arena-too", "--preallocate-too"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "running ours_device_features" in line:  # ours and the reference have finished
      proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 143, "".join(lines)
  text = "".join(lines)
  assert "stopped by SIGTERM: not run: ours_device_features, ours_preallocate, ours_one_arena" in text, text
  assert "| reference: numpy eval_func" in text and "features already in device memory" not in text, text
  goals = [l for l in lines if l.startswith("goal ")]
  assert [g.split(":")[0] for g in goals] == ["goal speedup_vs_reference", "goal ours_peak_rss",
                                              "goal metrics_vs_reference"], goals


def test_runtime_memory_reports_each_setting(tmp_path):
  """runtime_memory.py: one fresh process per environment setting, each reporting RSS at every start-up point and
  the environment it ran with (the setting reaches the process)."""
  import json  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "benchmarks/runtime_memory.py", "--settings", "noprealloc,cpu", "--json",
                        str(tmp_path / "rss.json")], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "rss.json").read_text())
  assert sorted(results) == ["cpu", "noprealloc"]
  assert results["noprealloc"]["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert results["cpu"]["env"]["JAX_PLATFORMS"] == "cpu"
  for r in results.values():
    points = r["points"]
    assert list(points) == ["python", "import jax", "backend", "tiny op", "matmul", "untuned matmul"]
    assert 0 < points["python"]["VmRSS"] < points["untuned matmul"]["VmRSS"] < 20
  assert "setting          RSS after the untuned product (GB)" in out.stdout


def test_profile_variants_name_real_options():
  """Each profile_step variant's XLA options are options XLA parses (a misspelt flag or command-buffer kind would only
  show on the GPU machine, minutes into a scarce call), and its model settings exist in clip.py."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clipreid_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO / "benchmarks"))
  import profile_step  # pylint: disable=g-import-not-at-top
  for name, (_, options, settings) in profile_step.VARIANTS.items():
    if options:
      jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.ones(2)).compile()
    assert all(hasattr(clip_lib, k) for k in settings), name
    # step_benchmark.build_jax_job sets the attention from the job's variant, over any module setting: the 'xla'
    # variant set it that way and timed cuDNN's attention twice.
    assert "ATTENTION_IMPLEMENTATION" not in settings, name
  assert profile_step.VARIANTS["xla"][0] == {"variant": "xla"}
  with pytest.raises(Exception, match="not a valid enum value"):  # the check above can fail
    jax.jit(lambda x: x + 1, compiler_options={"xla_gpu_enable_command_buffer": "FUSIONS"}).lower(jnp.ones(2)).compile()


def test_aot_report_compiles_the_trainers_programs(tmp_path):
  """The ahead-of-time report (run here on this CPU, a small model) compiles the three programs and reports each
  one's memory from XLA's buffer assignment; the stage-2 step donates its state."""
  out = subprocess.run([sys.executable, "benchmarks/aot_report.py", "--targets", "cpu", "--tiny", "--json",
                        str(tmp_path / "aot.json")], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {r["program"]: r for r in json.loads((tmp_path / "aot.json").read_text())}
  assert set(rows) == {"stage2", "stage1", "eval"}
  for r in rows.values():
    assert r["peak_gib"] == pytest.approx(r["arguments_gib"] + r["outputs_gib"] - r["donated_gib"] + r["temp_gib"])
    assert r["temp_gib"] > 0
  # the state's arrays are reused as the step's outputs; the features are new
  assert rows["stage2"]["donated_gib"] == pytest.approx(rows["stage2"]["outputs_gib"], rel=0.01)
  assert rows["eval"]["donated_gib"] == 0
  assert "| cpu | 1 | stage2 | default |" in out.stdout
  bad = subprocess.run([sys.executable, "benchmarks/aot_report.py", "--targets", "cpu", "--programs",
                        "stage2,stage3"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert bad.returncode == 2 and "--programs: unknown program 'stage3'" in bad.stderr, bad.stderr[-2000:]


def test_aot_report_reads_xla_gpu_thunk_sequences():
  """What the host launches per call, from XLA:GPU's thunk-sequence dump: graphs and the thunks outside them at the
  top level, the kernels recorded in the graphs indented under them."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  import aot_report  # pylint: disable=g-import-not-at-top
  dump = ("000: kCommandBuffer [source       | next=003 (1)] \n"
          "    001: kCopy         [source        | next=002 (1) ] kCopy\n"
          "    002: kCustomKernel [prev=001 (1)  | sink ] loop_add_fusion grid: [1, 1, 1]\n"
          "003: kCuDnn         [prev=000 (1) | next=000 (1)] kCuDnn\n"
          "000: kCommandBuffer [prev=003 (1) | next=004 (1)] \n"
          "    004: kCustomKernel [source | sink ] input_reduce_fusion grid: [8, 1, 1]\n"
          "004: kConvolution   [prev=000 (1) | sink] kConvolution\n")
  assert aot_report.thunk_structure(dump) == {"host_launches": 4, "per_iteration": 0, "graphs": 2, "kernels": 5,
                                              "in_graphs": 3, "outside_graphs": {"kConvolution": 1, "kCuDnn": 1}}
  without_graphs = "000: kCustomKernel [source | next=001 (1)] f\n001: kCuDnn [prev=000 (1) | sink] kCuDnn\n"
  assert aot_report.thunk_structure(without_graphs)["host_launches"] == 2
  # a loop (the stage-1 epoch): its body's thunks are launched at every iteration, its graphs' kernels are not
  loop = ("000: kCommandBuffer [source | next=004 (1)]\n    001: kCustomKernel [source | sink] f\n"
          "004: kWhile         [prev=000 (1) | sink]\ncondition:\n    000: kCustomKernel [source | sink] c\n"
          "  body:\n    000: kCommandBuffer      [source        | next=011 (1)]\n"
          "        002: kCustomKernel [source | sink] g\n        003: kCustomKernel [source | sink] h\n"
          "    011: kCuDnn              [prev=000 (1)  | next=000 (1)] kCuDnn\n"
          "    012: kDynamicSliceFusion [prev=011 (1)  | sink        ] params=1, results=1\n")
  assert aot_report.thunk_structure(loop) == {
      "host_launches": 2, "per_iteration": 4, "graphs": 2, "kernels": 6, "in_graphs": 3,
      "outside_graphs": {"kCuDnn": 1, "kCustomKernel": 1, "kDynamicSliceFusion": 1}}
  hlo = ("  %all-reduce-start.1 = f32[768]{0} all-reduce-start(%p), replica_groups={}\n"
         "  %all-reduce-done.1 = f32[768]{0} all-reduce-done(%all-reduce-start.1)\n"
         "  %ag = bf16[64,512]{1,0} all-gather(%x), dimensions={0}\n")
  assert aot_report.collectives(hlo) == {"all-reduce": 1, "all-gather": 1}

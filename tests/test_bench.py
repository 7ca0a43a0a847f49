"""Smoke test of ``python -m sleep_jax.bench``: the command line, --only parsing and the JSON schema.

Runs ``--quick --only matmul_peak,train_step`` (tiny shape only) in a subprocess (one CPU device, as a user
would run it; conftest's 8 fake devices are not inherited). The figures themselves are
benchmarks, not tests: only their presence and types are checked.
"""

import json
import os
import subprocess
import sys

import pytest

from sleep_jax import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_only_accepts_repeats_and_commas():
  assert bench.parse_only(None) == list(bench.PARTS)
  assert bench.parse_only(["sampler,matmul_peak", "dream_trials"]) == [
      "matmul_peak", "sampler", "dream_trials"]
  with pytest.raises(SystemExit):
    bench.parse_only(["nope"])


def test_train_flops_formula_smollm2():
  from sleep_jax.model import config as mcfg
  cfg = mcfg.smollm2_135m()
  n = bench.matmul_params(cfg)
  # 30 layers x (q 576x576 + k, v 576x192 + o 576x576 + SwiGLU 3x576x1536) + lm head 576x49152.
  assert n["total"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 576 * 49152
  assert n["masked_slots"] == 0
  assert bench.matmul_params(cfg, executed=True)["masked_slots"] == 30 * 3 * (4 * 2 * 576 * 64
                                                                               + 576 * 4)
  f = bench.train_flops(cfg, 2, 128)
  assert f["model_flops"] == 6 * n["total"] * 256 + 6 * 30 * 9 * 64 * 2 * 128 ** 2


def test_measure_reports_walls_and_free_cores():
  from sleep_jax.bench.harness import measure
  m = measure([lambda: sum(range(100000))] * 2)
  assert len(m["walls_s"]) == 2 and all(w > 0 for w in m["walls_s"])
  assert m["free_cores"] is None or 0.0 <= m["free_cores"] <= 1.0
  assert m["cpu_util"] >= 0.0


def test_published_peaks():
  assert bench.published_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert bench.published_peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert bench.published_peak_tflops("TPU v5 lite") == 197.0
  assert bench.published_peak_tflops("cpu") is None


def test_cli_quick_schema(tmp_path):
  out = tmp_path / "bench.json"
  md = tmp_path / "bench.md"
  # One device, and -O0 as for the rest of the suite: this checks the schema, not the speed
  # (the command alone on 2 idle cores: 26.3 s at XLA's default level, 13.6 s at -O0).
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  p = subprocess.run(
      [sys.executable, "-m", "sleep_jax.bench", "--quick", "--only", "matmul_peak,train_step",
       "--out", str(out), "--markdown", str(md)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["schema"] == bench.SCHEMA
  assert res["quick"] is True
  for key in ("jax_version", "backend", "device_kind", "cpu_count", "platform"):
    assert key in res["machine"], key
  assert set(res["parts"]) == {"matmul_peak", "train_step"}
  assert res["errors"] == {}
  mp = res["parts"]["matmul_peak"]
  assert mp["best_gflops"]["float32"] > 0
  assert mp["memory_bandwidth"]["best_GBps"] > 0
  assert all({"n", "gflops", "dtype"} <= set(r) for r in mp["sizes"])
  tiny = res["parts"]["train_step"]["tiny"]["best"]
  for key in ("step_s", "tokens_per_s", "mfu", "model_flops", "remat", "batch", "seq"):
    assert key in tiny, key
  assert tiny["mfu"] > 0 and "flops_formula" in res["parts"]["train_step"]
  masked = res["parts"]["train_step"]["masked_slots"]
  assert masked["ratio"] > 0 and masked["n_slots"] > 0
  names = [t["name"] for t in res["targets"]]  # CPU: the GPU-only 1B target is left out
  assert len(names) == 10 and all({"target", "measured", "met"} <= set(t) for t in res["targets"])
  assert "matmul_peak" in md.read_text()


@pytest.mark.slow
def test_sleep_step_quick(tmp_path):
  """The sleep_step part end to end on the tiny model: every part timed, a positive bound."""
  out = tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  p = subprocess.run([sys.executable, "-m", "sleep_jax.bench", "--quick", "--only", "sleep_step",
                      "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  part = json.loads(out.read_text())["parts"]["sleep_step"]
  assert set(part["parts_s"]) == {"sample", "teacher_forward", "rewards", "student_update", "host"}
  assert part["parts_s"]["student_update"] > 0 and part["lower_bound_s"] > 0
  assert part["step_over_bound"] > 1.0
  assert part["parts_s"]["teacher_forward"] > 0  # the continuation forwards were timed
  assert part["lower_bound_whole_prompt_s"] > part["lower_bound_s"]

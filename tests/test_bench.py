"""The benchmarks run and report what they measured (figures are never asserted: see bench/)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_meta_step_bench_without_peers_reports_our_rows_and_no_ratio(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "meta_step.py"), "--workloads=sine",
         "--algorithms=maml,anil", "--orders=second,first", "--xla=false", "--peers=",
         "--repeats=1", "--min_seconds=0.05", f"--json={out}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "failed" not in result.stdout
    # Without peers there is no ratio, and the bench says why rather than printing old figures.
    assert "No ratio: no peer was measured in this run" in result.stdout
    rows = json.loads(out.read_text())
    assert {(r["algorithm"], r["order"]) for r in rows} == {
        ("maml", "second"), ("maml", "first"), ("anil", "second"), ("anil", "first")}
    for row in rows:
        assert row["impl"] == "tf_maml" and row["ms"] > 0 and row["gflop"] > 0
        assert row["ratio_to_best_peer"] is None and row["best_peer"] is None
    # Speed-ups are relative to second-order MAML measured in the same run.
    maml = next(r for r in rows if (r["algorithm"], r["order"]) == ("maml", "second"))
    for row in rows:
        assert abs(row["speedup_over_second_order_maml"] - maml["ms"] / row["ms"]) < 1e-9


def test_meta_step_bench_fails_when_one_of_its_configurations_fails(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "meta_step.py"), "--workloads=sine",
         "--algorithms=no_such_algorithm", "--orders=first", "--xla=false", "--peers=",
         "--repeats=1", "--min_seconds=0.05"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode != 0
    assert "1 tf_maml configuration(s) failed: sine no_such_algorithm first" in result.stderr


def test_rl_bench_builds_the_flagfiles_run_and_times_its_parts():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "rl_meta_iteration.py"),
         "--flagfile=flags/rl_navigation.flags", "--meta_batch_size=2", "--fast_batch_size=2",
         "--repeats=1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    # The flagfile's recipe with the command line's overrides, as the trainer builds it.
    assert ("MAML-TRPO navigation2d (second order): meta-batch 2, 2 episodes x 100 steps "
            "(sampled by steps: 4x the episode slots), 1 inner step(s), inner_lr 0.5") in out
    assert "(800 steps per iteration)" in out
    for part in ("meta-iteration:", "sampling alone:", "trpo step alone:"):
        assert part in out
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "rl_meta_iteration.py")],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert missing.returncode != 0 and "give a recipe: --flagfile=" in missing.stderr


def test_xla_compiler_bench_times_the_program_and_names_a_missing_jax():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "xla_compiler.py"), "--programs=square",
         "--iterations=5", "--repeats=1", "--min_seconds=0.01", "--print_hlo"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    line = next(row for row in out.splitlines() if row.startswith("square"))
    assert float(line.split("XLA")[1].split()[0]) > 0  # microseconds per iteration
    # Three 40 -> 40 layers: TensorFlow's XLA keeps three batched products.
    assert sum(" dot(" in row and "f32[25,10,40]" in row for row in out.splitlines()) == 3
    try:
        import jax  # noqa: F401
    except ImportError:
        assert "JAX is not installed in the peer interpreter" in out


def test_meta_gradient_precision_bench_compares_each_path_with_float64():
    """Random strokes, a smooth activation: every float32 path is within round-off of the
    float64 reference (a bound on correctness, not a speed figure)."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "meta_gradient_precision.py"),
         "--activation=softplus", "--n_way=3", "--meta_batch_size=2", "--num_inner_steps=2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines()
            if line.startswith(("layer-batched", "per-task", "float64, weights"))]
    assert len(rows) == 3, result.stdout
    for row in rows:
        max_error = float(row.split()[-2])
        assert max_error < 1e-4, row

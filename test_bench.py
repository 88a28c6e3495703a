"""The benchmarks cannot rot: each runs its own code end to end at tiny sizes (--smoke), on CPU, in CI. No timing is
asserted (timings live in the README, measured alone by the command named there).

  python -m pytest -q test_bench.py
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def run(*command):
    result = subprocess.run([sys.executable, *command], cwd=HERE, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_bench_loss_smoke_runs_every_variant_and_they_agree():
    out = run("bench_loss.py", "--smoke", "--variants", "floor,eager,compiled,naive")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| the three GEMMs (floor)", "| ours, eager, chunk 16",
                                                 "| ours, compiled, chunk 16", "| naive (full T x V logits)"]
    losses = {r.split(" | ")[6] for r in rows[1:]}
    assert len(losses) == 1  # the same loss from every variant (the script also asserts it)


def test_bench_gpu_smoke_runs_the_gpu_checks_code_on_cpu(tmp_path):
    out = run("bench_gpu.py", "--smoke", "--out", str(tmp_path / "table.md"))
    table = (tmp_path / "table.md").read_text()
    assert table in out and "without --grad-checkpointing" in table and "with --grad-checkpointing" in table
    assert table.count("| 256 |") == 3 and "naive (T x V logits)" in table and "(the rollouts above)" in table


def test_the_memory_plan_counts_the_public_qwen3_shapes():
    out = run("bench_gpu.py", "--memory-plan")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out.splitlines() if line.startswith("| Qwen3-")}
    assert list(rows) == ["Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B"]
    assert rows["Qwen3-1.7B"][1] == "3.4 GB"  # 1.72B parameters in bf16 (the embedding is tied)
    assert rows["Qwen3-8B"][1] == "16.4 GB" and rows["Qwen3-32B"][7].startswith("no")

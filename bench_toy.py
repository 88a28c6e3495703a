"""
The toy-world comparison: OPSD, GRPO and SFT from the same warm start, each for a fixed budget, over
several seeds. Reports held-out greedy accuracy against generated tokens and against wall-clock time,
the spread over seeds, and how many generated tokens OPSD needs to reach GRPO's final accuracy.

The budgets match in generated tokens per step: OPSD samples 1 rollout for each of 32 problems, GRPO
8 rollouts for each of 4 problems; SFT generates nothing (it trains on the references).

  python bench_toy.py                          # 3 seeds x 3 methods (~30-40 min on 2 cores)
  python bench_toy.py --seeds 0 --steps 50     # a quick look
Finished runs are skipped on a re-run (each run's log.jsonl is complete), so it can be stopped and resumed.
Writes OUT/results.json, OUT/results.md and the plot (matplotlib, optional).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import toy

parser = argparse.ArgumentParser(description="OPSD vs GRPO vs SFT in the CPU toy world.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--methods", default="opsd,grpo,sft", help="comma-separated scripts to run")
parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (same for every method)")
parser.add_argument("--eval-every", type=int, default=25, help="held-out greedy eval every N steps")
parser.add_argument("--out-dir", default="runs/toy_bench", help="where runs, results and the plot go")
parser.add_argument("--plot", default="bench_toy.png", help="PNG path for the plot ('' to skip)")
parser.add_argument("--threads", type=int, default=2, help="torch threads per run")


def run_one(method, seed, args):
    out = os.path.join(args.out_dir, f"{method}_seed{seed}")
    log = os.path.join(out, "log.jsonl")
    if os.path.exists(log) and any(r.get("step") == args.steps and "eval" in r for r in map(json.loads, open(log))):
        print(f"{method} seed {seed}: done already, skipped", flush=True)
        return out
    if os.path.exists(out):
        import shutil
        shutil.rmtree(out)  # a partial run: start it again (checkpoints are only every --steps)
    cmd = [sys.executable, f"{method}.py", "--preset", "toy", "--seed", str(seed), "--max-steps", str(args.steps),
           "--eval-every", str(args.eval_every), "--save-every", str(args.steps), "--out-dir", out]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)), stdout=subprocess.DEVNULL)
    print(f"{method} seed {seed}: {time.time() - t0:.0f}s", flush=True)
    return out


def curve(out):
    """[(step, generated tokens so far, training seconds so far, accuracy)] from a run's log.jsonl."""
    tokens, seconds, points = 0, 0.0, []
    for record in map(json.loads, open(os.path.join(out, "log.jsonl"))):
        if "eval" in record:
            points.append((record["step"], tokens, seconds, record["eval"]["avg"]))
        else:
            tokens = record.get("generated_tokens_total", 0)
            seconds += record["time_step"]
    return points


def main():
    args = parser.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    p = toy.ensure_prepared()
    start = toy.accuracy(p["warm"], p["test"])
    teacher = toy.accuracy(p["warm"], p["test"], teacher=True)
    print(f"warm start: student {start:.1%}, teacher {teacher:.1%}", flush=True)
    runs = {(m, s): run_one(m, s, args) for s in seeds for m in methods}  # seed-major: early results cover every method
    curves = {m: [curve(runs[m, s]) for s in seeds] for m in methods}
    # mean and spread over seeds at each eval step (all runs of a method share the eval steps)
    results = {"warm_start": start, "teacher": teacher, "steps": args.steps, "seeds": seeds, "methods": {}}
    for m, runs in curves.items():
        rows = []
        for i, (step, *_rest) in enumerate(runs[0]):
            accs = [r[i][3] for r in runs]
            rows.append({"step": step, "tokens": statistics.mean(r[i][1] for r in runs),
                         "seconds": statistics.mean(r[i][2] for r in runs), "acc": statistics.mean(accs),
                         "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "acc_seeds": accs})
        results["methods"][m] = rows
    if "opsd" in curves and "grpo" in curves:
        # generated tokens OPSD needs to reach GRPO's final mean accuracy: linear interpolation between the
        # eval points of OPSD's mean curve (the warm start is the point at 0 tokens)
        target = results["methods"]["grpo"][-1]["acc"]
        points = [(0.0, start)] + [(r["tokens"], r["acc"]) for r in results["methods"]["opsd"]]
        reached = 0.0 if start >= target else None
        for (t0, a0), (t1, a1) in zip(points, points[1:]):
            if reached is None and a0 < target <= a1:  # the first segment that crosses the target
                reached = t0 + (t1 - t0) * (target - a0) / (a1 - a0)
        results["opsd_tokens_to_grpo_final"] = reached
        results["token_ratio"] = reached and results["methods"]["grpo"][-1]["tokens"] / max(1.0, reached)
    lines = [f"warm start: student {start:.1%}, teacher (reference in context) {teacher:.1%}; "
             f"{len(seeds)} seeds, {args.steps} steps, held-out greedy accuracy (mean ± std over seeds)", "",
             "| method | final accuracy | gain over warm start | generated tokens | training time (s) |", "|---|---|---|---|---|"]
    for m, rows in results["methods"].items():
        last = rows[-1]
        lines.append(f"| {m} | {last['acc']:.1%} ± {last['acc_std']:.1%} | {last['acc'] - start:+.1%} | "
                     f"{last['tokens']:,.0f} | {last['seconds']:.0f} |")
    if results.get("token_ratio"):
        lines.append(f"\nOPSD reaches GRPO's final accuracy ({results['methods']['grpo'][-1]['acc']:.1%}) after "
                     f"~{results['opsd_tokens_to_grpo_final']:,.0f} generated tokens (interpolated between evals): "
                     f"{results['token_ratio']:.1f}x fewer than GRPO's "
                     f"{results['methods']['grpo'][-1]['tokens']:,.0f}.")
    elif "token_ratio" in results:
        lines.append("\nOPSD does not reach GRPO's final accuracy within the budget.")
    report = "\n".join(lines)
    print("\n" + report)
    os.makedirs(args.out_dir, exist_ok=True)
    json.dump(results, open(os.path.join(args.out_dir, "results.json"), "w"), indent=1)
    open(os.path.join(args.out_dir, "results.md"), "w").write(report + "\n")
    if args.plot:
        plot(results, args.plot)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, rows in results["methods"].items():
        for ax, key in zip(axes, ("tokens", "seconds")):
            if key == "tokens" and m == "sft":
                continue  # SFT generates nothing
            xs = [0] + [r[key] for r in rows]
            ys = [results["warm_start"]] + [r["acc"] for r in rows]
            errs = [0] + [r["acc_std"] for r in rows]
            ax.errorbar(xs, ys, yerr=errs, label=m, marker="o", capsize=3)
    for ax, label in zip(axes, ("generated tokens", "training wall-clock (s)")):
        ax.axhline(results["teacher"], color="gray", linestyle="--", label="teacher (reference shown)")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out greedy accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"toy world: {len(results['seeds'])} seeds, mean ± std")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

"""
The toy-world benchmarks: runs from the same warm start, for the same number of steps, over several seeds, with
greedy held-out accuracy every --eval-every steps (256 test problems, the same for every run, at the toy's 96-token
eval budget whatever the run's rollout limit).

  python bench_toy.py                       # methods: OPSD, GRPO and SFT, with own-style and expert references
  python bench_toy.py --table variants      # OPSD variants and the ideas/ patches, own-style references
  python bench_toy.py --table teachers      # the teacher's weights: fixed, live, EMA
  python bench_toy.py --table budget        # the student's rollout limit: 32, 48, 64, 96 tokens
  python bench_toy.py --table teachers-seen # what the teacher sees (solution, answer, another's, nothing), and an
                                            # external teacher (toy.external_teacher) seeing nothing or the solution
  python bench_toy.py --seeds 0 --steps 50  # a quick look
  python bench_toy.py --table variants --only "opsd sampled-token"   # some runs only (two processes can share a table)
Budgets match in generated tokens per step: OPSD samples 1 rollout for each of 32 problems, GRPO 8 rollouts for each
of 4 problems; SFT generates nothing (it trains on the references). Every method uses the learning rate of its toy
settings (toy.PRESETS): GRPO's 3e-4 is the best of a four-point sweep, OPSD's and SFT's 1e-3 were not swept. Finished
runs are skipped on a re-run (a run is finished when its log holds the final eval), so the benchmark can be stopped
and resumed. Writes OUT/<table>.json and OUT/<table>.md, and every curve as bench_toy[_<table>].png (matplotlib).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import plumbing
import prompts
import toy

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (script, extra flags, ideas/ patch applied to a copy of opsd.py)
RUNS = {
    "opsd": ("opsd", [], None),
    "grpo": ("grpo", [], None),
    "sft": ("sft", [], None),
    "opsd forward KL": ("opsd", ["--beta", "0"], None),
    "opsd forward KL + entry clip 0.05": ("opsd", ["--beta", "0", "--entry-clip", "0.05"], None),
    "opsd sampled-token": ("opsd", ["--loss", "sampled"], None),
    "opsd sampled-token + vOPD baseline": ("opsd", ["--loss", "sampled", "--baseline", "vopd"], None),
    "opsd answer-only teacher": ("opsd", ["--teacher-context", "answer"], None),
    "idea: geometric mixture w=0.5": ("opsd", ["--mixture-weight", "0.5"], "geometric_mixture"),
    "idea: reference-only correction 0.5": ("opsd", ["--reference-correction", "0.5"], "reference_only"),
    "idea: task reward w=1": ("opsd", ["--reward-weight", "1"], "task_reward"),
    "opsd live teacher": ("opsd", ["--teacher-weights", "live"], None),
    "opsd EMA teacher 0.99": ("opsd", ["--teacher-weights", "ema", "--ema-decay", "0.99"], None),
    **{f"opsd rollouts <= {n}": ("opsd", ["--max-new-tokens", str(n)], None) for n in (32, 48, 64)},
    # what the teacher is shown (TEACHER: toy.external_teacher, the warm start after SFT on the references)
    "self sees another problem's solution": ("opsd", ["--teacher-context", "other"], None),
    "self sees nothing": ("opsd", ["--teacher-context", "none"], None),
    "external sees nothing": ("opsd", ["--teacher-model", "TEACHER", "--teacher-context", "none"], None),
    "external sees the solution": ("opsd", ["--teacher-model", "TEACHER"], None),
}
TABLES = {"methods": (["opsd", "grpo", "sft"], ["own", "expert"]),
          "variants": (["opsd", "opsd forward KL", "opsd forward KL + entry clip 0.05", "opsd sampled-token",
                        "opsd sampled-token + vOPD baseline", "opsd answer-only teacher",
                        "idea: geometric mixture w=0.5", "idea: reference-only correction 0.5",
                        "idea: task reward w=1"], ["own"]),
          "teachers": (["opsd", "opsd live teacher", "opsd EMA teacher 0.99"], ["own"]),
          "budget": (["opsd rollouts <= 32", "opsd rollouts <= 48", "opsd rollouts <= 64", "opsd"], ["own"]),
          "teachers-seen": (["opsd", "opsd answer-only teacher", "self sees another problem's solution",
                             "self sees nothing", "external sees nothing", "external sees the solution"], ["own"])}

parser = argparse.ArgumentParser(description="OPSD, GRPO and SFT (or OPSD's variants) in the CPU toy world.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--table", choices=sorted(TABLES), default="methods", help="which comparison to run")
parser.add_argument("--settings", default=None, help="comma-separated reference settings (default: the table's)")
parser.add_argument("--only", default=None, help="comma-separated run names of the table (no table is written)")
parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
parser.add_argument("--steps", type=plumbing.positive_int, default=150, help="optimizer steps per run")
parser.add_argument("--eval-every", type=plumbing.positive_int, default=25, help="held-out greedy eval every N steps")
parser.add_argument("--out-dir", default="runs/toy_bench", help="where runs and results go")
parser.add_argument("--plot", default=None, help="PNG path ('' to skip; default bench_toy[_TABLE].png)")
parser.add_argument("--threads", type=plumbing.positive_int, default=2, help="torch threads per run")


def apply_idea(name, directory):
    """A copy of opsd.py with ideas/<name>.diff applied, in `directory`; run it with this folder on PYTHONPATH."""
    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(HERE, "opsd.py"), directory)
    with open(os.path.join(HERE, "ideas", f"{name}.diff")) as diff:
        subprocess.run(["patch", "--quiet", "-p1", "-d", directory], stdin=diff, check=True)
    return os.path.join(directory, "opsd.py")


def run_one(name, setting, seed, args):
    slug = name.replace(" ", "_").replace(":", "").replace("<=", "max")
    out = os.path.join(args.out_dir, setting, f"{slug}_seed{seed}")
    log = os.path.join(out, "log.jsonl")
    rows = prompts.read_jsonl(log, torn_tail_ok=True)[0] if os.path.exists(log) else []
    done = rows and max(r["step"] for r in rows) == args.steps and any(r["step"] == args.steps and "eval" in r
                                                                        for r in rows)
    if done:
        print(f"{setting} / {name} / seed {seed}: done already, skipped", flush=True)  # the same length, finished
        return out
    shutil.rmtree(out, ignore_errors=True)  # a partial run starts again (it checkpoints only at the end)
    script, flags, idea = RUNS[name]
    flags = [toy.external_teacher(setting) if flag == "TEACHER" else flag for flag in flags]
    if idea:  # the patched opsd.py with the toy settings as flags
        cmd = [sys.executable, apply_idea(idea, os.path.join(args.out_dir, "ideas", idea)),
               *toy.script_argv(script, setting)]
    else:
        cmd = [sys.executable, os.path.join(HERE, "toy.py"), script, "--references", setting]
    cmd += ["--seed", str(seed), "--max-steps", str(args.steps), "--eval-every", str(args.eval_every), "--save-every",
            str(args.steps), "--eval-max-new-tokens", str(toy.PRESETS["eval"]["max_new_tokens"]), "--out-dir", out,
            *flags]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    print(f"{setting} / {name} / seed {seed}: {time.time() - t0:.0f}s", flush=True)
    return out


def curve(out):
    """[(step, generated tokens so far, training seconds so far, accuracy, share of rollouts cut at the limit so far)]
    from a run's log.jsonl."""
    tokens, seconds, truncated, points = 0, 0.0, [], []
    for record in prompts.read_jsonl(os.path.join(out, "log.jsonl"), torn_tail_ok=True)[0]:
        if "eval" in record:
            points.append((record["step"], tokens, seconds, record["eval"]["avg"], statistics.mean(truncated or [0])))
        else:
            tokens = record.get("generated_tokens_total", 0)
            seconds += record["time_step"]
            truncated.append(record.get("truncated", 0.0))  # SFT's steps generate nothing
    return points


def summarize(curves):
    """Mean and spread over seeds at each eval step (all runs share the eval steps)."""
    rows = []
    for i, (step, *_rest) in enumerate(curves[0]):
        accs = [c[i][3] for c in curves]
        rows.append({"step": step, "tokens": statistics.mean(c[i][1] for c in curves),
                     "seconds": statistics.mean(c[i][2] for c in curves), "acc": statistics.mean(accs),
                     "truncated": statistics.mean(c[i][4] for c in curves),
                     "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "acc_seeds": accs})
    return rows


def tokens_to_reach(start, rows, target):
    """Generated tokens a curve needs to reach `target` accuracy: linear interpolation between its eval points (the
    warm start is the point at 0 tokens); 0 if it starts there, None if it never gets there."""
    if start >= target:
        return 0.0
    points = [(0.0, start)] + [(r["tokens"], r["acc"]) for r in rows]
    for (t0, a0), (t1, a1) in zip(points, points[1:]):
        if a0 < target <= a1:
            return t0 + (t1 - t0) * (target - a0) / (a1 - a0)
    return None


def cell(rows):
    last = rows[-1]
    return f"{last['acc']:.1%}" + (f" ± {last['acc_std']:.1%}" if len(last["acc_seeds"]) > 1 else "")  # one: no spread


def report(results, table):
    lines, notes = [], []
    if table == "methods":
        lines += ["| setting | OPSD | GRPO | SFT on the references | warm start | teacher (reference shown) |",
                  "|---|---|---|---|---|---|"]
        for setting, r in results["settings"].items():
            lines.append(f"| {setting} | {cell(r['runs']['opsd'])} | {cell(r['runs']['grpo'])} | "
                         f"{cell(r['runs']['sft'])} | "
                         f"{r['warm_start']:.1%} | {r['teacher']:.1%} |")
        lines += ["", "| setting | method | gain over warm start (points) | generated tokens | training time (s) |",
                  "|---|---|---|---|---|"]
    else:
        for setting, r in results["settings"].items():
            lines += [f"{setting} references: warm start {r['warm_start']:.1%}; teacher with the reference "
                      f"{r['teacher']:.1%}, with only the final answer {r['teacher_answer_only']:.1%} (the warm start "
                      "never showed it an answer alone)", ""]
            if "external" in r:
                lines += [f"external teacher (the warm start after 150 steps of SFT on the references): "
                          f"{r['external']:.1%} with no reference, {r['external_solution']:.1%} with the reference "
                          "shown", ""]
        lines += ["| variant | flags | final accuracy | gain over warm start (points) | rollouts cut at the limit | "
                  "generated tokens | training time (s) |",
                  "|---|---|---|---|---|---|---|"]
    for setting, r in results["settings"].items():
        for name, rows in r["runs"].items():
            last, gain = rows[-1], 100 * (rows[-1]["acc"] - r["warm_start"])
            if table == "methods":
                lines.append(f"| {setting} | {name} | {gain:+.1f} | {last['tokens']:,.0f} | {last['seconds']:.0f} |")
            else:
                lines.append(f"| {name} | `{' '.join(RUNS[name][1]) or '(defaults)'}` | {cell(rows)} | {gain:+.1f} | "
                             f"{last['truncated']:.1%} | {last['tokens']:,.0f} | {last['seconds']:.0f} |")
        if "opsd" in r["runs"] and "grpo" in r["runs"]:
            grpo = r["runs"]["grpo"][-1]
            reached = tokens_to_reach(r["warm_start"], r["runs"]["opsd"], grpo["acc"])
            if reached is None:
                notes.append(f"{setting}: OPSD does not reach GRPO's final accuracy ({grpo['acc']:.1%}) in the budget.")
            else:
                ratio = grpo["tokens"] / max(reached, 1.0)
                notes.append(f"{setting}: OPSD reaches GRPO's final accuracy ({grpo['acc']:.1%}) after ~{reached:,.0f} "
                             f"generated tokens (interpolated between evals), {ratio:.1f}x fewer than GRPO's "
                             f"{grpo['tokens']:,.0f}.")
    return "\n".join(lines + [""] * bool(notes) + notes)


def plot(results, path):
    """Accuracy against generated tokens, one curve per run (mean ± std over seeds), a panel per setting."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    settings = results["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, (setting, r) in zip(axes[0], settings.items()):
        for name, rows in r["runs"].items():
            if name == "sft":  # SFT generates no tokens: its final accuracy, as a line
                ax.axhline(rows[-1]["acc"], color="tab:green", linestyle="-.",
                           label="SFT on the references (final, 0 tokens)")
                continue
            label = name.upper() if results["table"] == "methods" else name
            ax.errorbar([0] + [x["tokens"] for x in rows], [r["warm_start"]] + [x["acc"] for x in rows],
                        yerr=[0] + [x["acc_std"] for x in rows], label=label, marker="o", capsize=3)
        ax.axhline(r["teacher"], color="gray", linestyle="--", label="teacher (reference shown)")
        ax.set_title(f"{setting} references")
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("held-out greedy accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"toy world: {len(results['seeds'])} seeds, mean ± std, {results['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main():
    args = parser.parse_args()
    names, default_settings = TABLES[args.table]
    if args.only:
        unknown = set(args.only.split(",")) - set(names)
        if unknown:
            parser.error(f"--only: not runs of the {args.table} table: {', '.join(sorted(unknown))} (choose from "
                         f"{', '.join(names)})")
        names = [n for n in names if n in args.only.split(",")]
    settings = args.settings.split(",") if args.settings else default_settings
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"table": args.table, "steps": args.steps, "seeds": seeds, "settings": {}}
    for setting in settings:
        p = toy.ensure_prepared(setting)
        start = toy.accuracy(p["warm"], p["test"])
        teacher = toy.accuracy(p["warm"], p["test"], teacher_context="solution")
        answer_only = toy.accuracy(p["warm"], p["test"], teacher_context="answer")  # a context its warm start never had
        print(f"{setting} references: warm start student {start:.1%}, teacher {teacher:.1%} (answer only: "
              f"{answer_only:.1%})", flush=True)
        outs = {(n, s): run_one(n, setting, s, args) for s in seeds for n in names}  # seed-major: every run early
        results["settings"][setting] = {"warm_start": start, "teacher": teacher, "teacher_answer_only": answer_only,
                                        "runs": {n: summarize([curve(outs[n, s]) for s in seeds]) for n in names}}
    if args.only:  # a part of the table: its runs are done (and skipped by the next full run), no table
        return
    if any("TEACHER" in RUNS[n][1] for n in names):  # how good the external teacher is, alone and shown y*
        for setting in settings:
            external = toy.external_teacher(setting)
            test = toy.ensure_prepared(setting)["test"]  # prepared above: this only reads where it is
            row = results["settings"][setting]
            row["external"] = toy.accuracy(external, test)
            row["external_solution"] = toy.accuracy(external, test, teacher_context="solution")
    text = (f"{len(seeds)} seed{'s' * (len(seeds) > 1)}, {args.steps} steps, held-out greedy accuracy on 256 test "
            "problems"
            f"{' (mean ± std over seeds)' * (len(seeds) > 1)}\n\n"
            + report(results, args.table))
    print("\n" + text)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"{args.table}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out_dir, f"{args.table}.md"), "w") as f:
        f.write(text + "\n")
    path = f"bench_toy{'' if args.table == 'methods' else '_' + args.table}.png" if args.plot is None else args.plot
    if path:
        plot(results, path)


if __name__ == "__main__":
    main()

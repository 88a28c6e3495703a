"""
Evaluate a base model, a trained adapter, or every checkpoint of a run on the paper's benchmarks: avg@n, pass@k, maj@k.

  1. problems: AIME24, AIME25, HMMT Feb 25 and AMO-Bench (prompts.BENCHMARKS), or a local file;
  2. prompt: prompts.student_prompt_ids, the prompt training uses (thinking on, as in the paper), or the OPSD teacher's
     prompt with --teacher-context;
  3. sample n completions per problem, many problems per sampler call: vLLM on GPU (the adapter as a LoRARequest),
     HF generate on CPU (the adapter loaded with PEFT) and for a --full-finetune run's checkpoints (whole models);
     a problem's samples depend only on --seed and the problem;
  4. grade the last \\boxed{} against the gold answer (prompts.grade: math-verify + a normalised compare);
  5. per problem avg@n, pass@k (unbiased) and maj@k; means per benchmark and over all problems.
Samples are appended to samples.jsonl after every sampler call, so a kill loses at most the call in flight
(--batch-size problems x --samples samples), and `--resume` samples only what is missing, with the same summary.
`--checkpoints RUN_DIR` evaluates every checkpoint of a training run (one sub-directory each; `--resume` skips the
finished ones) and writes the curve, curve.md and curve.png: pick the best checkpoint, not the last. A checkpoint that
cannot be evaluated (incomplete, or its weights unreadable) is skipped with a line saying why.

Departures from the official OPSD eval code: the prompt is the training prompt (theirs differ); only the last \\boxed{}
is parsed (math-verify's default also grades unboxed text); AMO-Bench rows that need an LLM judge are dropped;
temperature 1.2 as in the paper (the official scripts: 1.0).

Run:
  python eval.py                                                    # Qwen3-1.7B base, 1 GPU (vLLM), 16 samples
  python eval.py --adapter runs/opsd/checkpoint-000100 --out-dir runs/eval/opsd-100   # a trained adapter
  python eval.py --checkpoints runs/opsd --out-dir runs/eval/opsd-curve               # every checkpoint of a run
  python eval.py --model runs/sft-full/checkpoint-000100            # a --full-finetune run: a whole model
  torchrun --standalone --nproc_per_node 8 eval.py --adapter runs/opsd   # 8 GPUs, problems split by rank
  python toy.py eval [--adapter runs/toy/opsd]                      # CPU toy world: greedy, 256 test problems
"""
import argparse
import glob
import json
import math
import os
from collections import Counter

import torch
import torch.distributed as dist

import models
import opsd
import plumbing
import prompts
import samplers

# -----------------------------------------------------------------------------
# 1. config


def get_parser():
    parser = argparse.ArgumentParser(description="avg@n / pass@k / maj@k of a model, an adapter or a run's checkpoints",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.presets = {}
    plumbing.model_options(parser, lora=False)
    group = parser.add_argument_group("weights")
    group.add_argument("--adapter", default=None,
                       help="a PEFT adapter dir, or a run dir (its latest complete checkpoint)")
    group.add_argument("--checkpoints", default=None, help="a run dir: evaluate every checkpoint in it, and the curve")
    group = parser.add_argument_group("data")
    group.add_argument("--benchmarks", default="aime24,aime25,hmmt25,amobench", help="comma-separated BENCHMARKS keys")
    group.add_argument("--data", default=None, help="a local .jsonl/.json/.parquet instead of --benchmarks")
    group.add_argument("--limit", type=plumbing.positive_int, default=None, help="the first N problems of each")
    group.add_argument("--teacher-context", choices=sorted(prompts.TEACHER_CONTEXTS), default=None,
                       help="prompt as the OPSD teacher with this context (default: the student prompt)")
    group = plumbing.sampling_options(parser, temperature=1.2, max_new_tokens=38912, gpu_memory=0.9, training=False)
    group.add_argument("--samples", type=plumbing.positive_int, default=16, help="samples per problem (n in avg@n)")
    group.add_argument("--batch-size", type=plumbing.positive_int, default=64, help="problems per sampler call")
    parser.set_defaults(top_p=0.95, thinking=True)  # the paper's evaluation: thinking on, top-p 0.95
    group = parser.add_argument_group("output")
    group.add_argument("--out-dir", default="runs/eval", help="samples.jsonl and summary.json go here")
    group.add_argument("--overwrite", action="store_true", help="delete an earlier evaluation's files first")
    group.add_argument("--resume", action="store_true", help="keep finished samples (and checkpoints); sample the rest")
    return parser


def check_options(args):
    """Combinations that cannot be what the user meant. An option given on the command line that does nothing in this
    combination is an error naming it (plumbing.refuse_inert; --top-p and --sampling-top-k with --temperature 0 are
    plumbing's shared rules); eval.py's own defaults (top-p 0.95) never are."""
    if args.adapter and args.checkpoints:
        raise prompts.UserError("--adapter and --checkpoints: give one (--checkpoints evaluates every checkpoint)")
    greedy = args.temperature == 0
    plumbing.refuse_inert(args, [
        ("samples", greedy and args.samples > 1, "with --temperature 0: greedy samples are all the same, so avg@n is "
                                                 "avg@1 (use --samples 1, or a temperature above 0)"),
        ("benchmarks", args.data is not None, "with --data (the problems come from the file)"),
    ])


# the weights to evaluate are checked before anything loads: a missing or truncated file is one line naming it, not
# a traceback from transformers or PEFT after the model (or half a curve) has loaded


def unreadable(file):
    """Why a .safetensors file cannot be read, or None. Its header lists where each tensor ends: a file cut short
    (a full disk, a killed copy) does not fit it, and opening it says so without reading the tensors."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(file, "pt"):
            return None
    except (SafetensorError, OSError) as e:
        return f"{type(e).__name__}: {str(e)[:200]}"


def model_problem(path):
    """Why a local model directory (--model, or a --full-finetune checkpoint) has no weights to load, or None. An
    HF id (no such directory) is downloaded and checked by transformers."""
    if not os.path.isdir(path):
        return None
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    pytorch_bins = glob.glob(os.path.join(path, "pytorch_model*.bin"))  # older checkpoints; transformers loads them
    if not files and not pytorch_bins:
        return "no weights there (no *.safetensors, no pytorch_model*.bin)"
    for file in files:
        why = unreadable(file)
        if why:
            return f"{os.path.basename(file)} is unreadable ({why})"
    return None


def adapter_config(path):
    with open(os.path.join(path, "adapter_config.json")) as f:
        return json.load(f)


def killed_save(path):
    """checkpoint-N.tmp: a save killed midway (the plumbing renames it to checkpoint-N once every file is written)."""
    name = os.path.basename(os.path.normpath(path))
    return name.endswith(".tmp") and plumbing.checkpoint_step(name.removesuffix(".tmp")) is not None


def adapter_problem(path):
    """Why `path` is not a PEFT adapter to evaluate, or None."""
    if not os.path.isdir(path):
        return "no such directory"
    if killed_save(path):
        return "an incomplete checkpoint (a save killed midway)"
    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        if os.path.exists(os.path.join(path, "config.json")):
            return "no adapter_config.json there: a whole model (a --full-finetune checkpoint?), so pass it as --model"
        return "no adapter_config.json there"
    try:
        adapter_config(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"adapter_config.json is unreadable ({type(e).__name__}: {e})"
    weights = os.path.join(path, "adapter_model.safetensors")
    if os.path.exists(weights):
        why = unreadable(weights)
        if why:
            return f"adapter_model.safetensors is unreadable ({why})"
        return None
    if os.path.exists(os.path.join(path, "adapter_model.bin")):  # PEFT's older format: PEFT and vLLM still load it
        return None
    return "no adapter_model.safetensors there"


def is_adapter(path):
    adapter_files = [os.path.join(path, name) for name in ("adapter_config.json", "adapter_model.safetensors")]
    return any(os.path.exists(file) for file in adapter_files)


def weights_problem(path):
    """Why a checkpoint's weights (an adapter, or a --full-finetune run's whole model) cannot be evaluated, or None."""
    if is_adapter(path):
        return adapter_problem(path)
    if not os.path.exists(os.path.join(path, "config.json")):
        return "no adapter_config.json or config.json there (neither an adapter nor a model)"
    return model_problem(path)


def why_incomplete(path):
    """What a checkpoint that plumbing.complete_checkpoints leaves out lacks."""
    if killed_save(path):
        return "an incomplete checkpoint (a save killed midway)"
    needed = ["run.json", "trainer_state.pt", "rng_rank0.pt", os.path.basename(plumbing.weights_file(path))]
    missing = [name for name in needed if not os.path.exists(os.path.join(path, name))]
    return f"an incomplete checkpoint (no {', '.join(missing)})"


def checkpoints_to_evaluate(run_dir):
    """--checkpoints: the run's checkpoints that can be evaluated, oldest first. Each of the others is skipped with a
    line saying why (incomplete, or its weights unreadable): one bad checkpoint must not cost the whole curve."""
    if not os.path.isdir(run_dir):
        raise prompts.UserError(f"--checkpoints {run_dir}: no such directory")
    complete = plumbing.complete_checkpoints(run_dir)
    found = []
    for path in glob.glob(os.path.join(run_dir, "checkpoint-*")):
        if plumbing.checkpoint_step(path) is not None or killed_save(path):
            found.append(path)
    # in step order, a killed re-save after the checkpoint of its step
    found.sort(key=lambda path: (plumbing.checkpoint_step(path.removesuffix(".tmp")), killed_save(path)))
    chosen = []
    for path in found:
        if path in complete:
            why = weights_problem(path)
        else:
            why = why_incomplete(path)
        if why:
            plumbing.print0(f"eval: skipping {path}: {why}")
        else:
            chosen.append(path)
    if not chosen:
        raise prompts.UserError(f"--checkpoints {run_dir}: no checkpoint there can be evaluated")
    return chosen


def chosen_adapter(path):
    """--adapter: an adapter dir, or a run dir, which stands for its latest complete checkpoint."""
    latest = plumbing.follow_latest(path)
    if latest == path and glob.glob(os.path.join(path, "checkpoint-*")):
        raise prompts.UserError(f"--adapter {path}: no complete checkpoint there")
    why = adapter_problem(latest)
    if why:
        raise prompts.UserError(f"--adapter {latest}: {why}")
    return latest

# -----------------------------------------------------------------------------
# 6. sample and grade, resumably: one samples file per rank, appended after each sampler call


def rank_path(out_path, rank, world):
    root, ext = os.path.splitext(out_path)
    return out_path if world == 1 else f"{root}.rank{rank}{ext}"


def finished_samples(out_path, rank, world):
    """(benchmark, problem_id, sample) -> row, from every samples file of the run (any earlier world size). This
    rank's own file is cut back to its last complete line: it is appended to next."""
    root, ext = os.path.splitext(out_path)
    done = {}
    for path in [out_path] + sorted(glob.glob(f"{root}.rank*{ext}")):
        if os.path.exists(path):
            rows, complete_bytes = prompts.read_jsonl(path, torn_tail_ok=True)
            if path == rank_path(out_path, rank, world):
                os.truncate(path, complete_bytes)
            done.update({(row["benchmark"], row["problem_id"], row["sample"]): row for row in rows})
    return done


def check_settings(path, settings, older_defaults=None):
    """The settings that produced a samples file live beside it: a resume with others would mix two evaluations.
    older_defaults: what a setting that an older eval.py did not record stood for (its default then), so that a
    resume at that default goes on."""
    with open(path) as f:
        saved = json.load(f)
    older_defaults = older_defaults or {}
    changes = []
    for name, value in settings.items():
        if name in saved:
            old = saved[name]
            then = ""
        else:
            old = older_defaults.get(name)
            then = " (the default then)" if name in older_defaults else ""
        if old != value:
            changes.append(f"{name}: was {old!r}{then}, now {value!r}")
    if changes:
        raise prompts.UserError(f"--resume: {path} was written with other settings: {'; '.join(changes)} (use a new "
                                "--out-dir, or --overwrite to start over)")


def run_eval(tokenizer, records, sampler, *, n, sampling, thinking, seed=0, teacher_context=None, rank=0, world=1,
             out_path=None, resume=False, settings=None, older_defaults=None, batch_size=64, lora_request=None,
             progress=False) -> dict:
    """Evaluate `records` (prompts.load_records dicts; an optional "benchmark" key groups them) with n samples per
    problem. Under torchrun this rank does problems range(rank, N, world) and the sums are all-reduced: every rank
    returns the same summary. With `out_path` every sample is appended there once its sampler call returns;
    `resume` keeps the samples already written (and refuses other `settings` than those saved beside them;
    older_defaults: check_settings)."""
    ks = [k for k in KS if k <= n]

    def key(record):
        return record.get("benchmark", "data"), record["id"]
    benchmarks = list(dict.fromkeys(key(r)[0] for r in records))  # the same order on every rank
    mine = records[rank::world]
    done = {}  # (benchmark, problem id, sample) -> the row a stopped run wrote
    file = None
    if out_path:
        settings_path = os.path.splitext(out_path)[0] + ".settings.json"
        if resume:
            if settings is not None and os.path.exists(settings_path):
                check_settings(settings_path, settings, older_defaults)
            done = finished_samples(out_path, rank, world)
        if world > 1:
            dist.barrier()  # every rank has read the files before any rank writes
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        if rank == 0 and settings is not None:
            with open(settings_path, "w") as f:
                json.dump(settings, f, indent=1)
        file = plumbing.JsonlFile(rank_path(out_path, rank, world))
    results = {key(r): {s: done[key(r) + (s,)] for s in range(n) if key(r) + (s,) in done} for r in mine}
    todo = [r for r in mine if len(results[key(r)]) < n]
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="eval", unit="problem", dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        rows = plumbing.graded_samples(tokenizer, chunk, sampler, n, sampling, thinking, seed, lora_request,
                                       teacher_context)
        new = []
        for i, row in enumerate(rows):
            record = chunk[i // n]  # the rows are n per record, in order
            s = i % n
            if s not in results[key(record)]:  # kept from the stopped run otherwise
                row = {"benchmark": key(record)[0], "problem_id": record["id"], "sample": s, **row}
                results[key(record)][s] = row
                new.append(row)
        if file:
            file.write(*new)
        if bar:
            bar.update(len(chunk))
            correct = [row["correct"] for rows in results.values() for row in rows.values()]
            bar.set_postfix_str(f"acc {sum(correct) / max(len(correct), 1):.3f}")
    if bar:
        bar.close()
    per_problem = {k: problem_metrics([rows[s] for s in range(n)], ks) for k, rows in results.items()}
    return reduce_summary(per_problem, benchmarks, ks, world)


# -----------------------------------------------------------------------------
# 7. summarise: per problem with c correct of n, avg@n = c / n, pass@k = 1 - C(n-c, k) / C(n, k) (unbiased, Chen et
# al. 2021), maj@k = is the most frequent answer among the first k samples right; then means


KS = (1, 2, 4, 8, 16)


def pass_at_k(n, c, k):
    """Unbiased pass@k as prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(answers, correct, k):
    """Majority vote over the normalised answers of the first k samples (no answer: no vote); ties go to the answer
    seen first."""
    keys = [None if a is None else prompts.normalize_answer(a) for a in answers[:k]]
    votes = Counter(key for key in keys if key is not None)
    return float(correct[keys.index(max(votes, key=votes.get))]) if votes else 0.0


def problem_metrics(samples, ks):
    """One problem's sums: samples, correct, length, pass@k, maj@k; samples are rows in sample order."""
    n = len(samples)
    c = sum(s["correct"] for s in samples)
    answers = [s["extracted"] for s in samples]
    correct = [s["correct"] for s in samples]
    return {"problems": 1, "samples": n, "correct": c, "length": sum(s["length"] for s in samples),
            **{f"pass@{k}": pass_at_k(n, c, k) for k in ks}, **{f"maj@{k}": maj_at_k(answers, correct, k) for k in ks}}


def summarize(sums, ks):
    problems = max(sums["problems"], 1)
    samples = max(sums["samples"], 1)
    return {"avg": sums["correct"] / samples, **{f"pass@{k}": sums[f"pass@{k}"] / problems for k in ks},
            **{f"maj@{k}": sums[f"maj@{k}"] / problems for k in ks}, "mean_length": sums["length"] / samples,
            "problems": int(sums["problems"]), "samples": int(sums["samples"])}


def reduce_summary(per_problem, benchmarks, ks, world):
    """Sum the per-problem metrics per benchmark, over ranks, then average: every rank gets the same summary."""
    fields = ["problems", "samples", "correct", "length"] + [f"{m}@{k}" for m in ("pass", "maj") for k in ks]
    sums = torch.zeros(len(benchmarks), len(fields), dtype=torch.float64)  # (B, F)
    for (benchmark, _), metrics in per_problem.items():
        sums[benchmarks.index(benchmark)] += torch.tensor([float(metrics[f]) for f in fields], dtype=torch.float64)
    if world > 1:
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        sums = sums.to(device)
        dist.all_reduce(sums)  # a sum, not a mean: ranks hold different numbers of problems
        sums = sums.cpu()
    per_benchmark = {b: summarize(dict(zip(fields, row.tolist())), ks) for b, row in zip(benchmarks, sums)}
    summary = summarize(dict(zip(fields, sums.sum(0).tolist())), ks)  # overall: every problem weighs the same
    summary["avg_of_benchmarks"] = sum(s["avg"] for s in per_benchmark.values()) / len(per_benchmark)
    return {**summary, "benchmarks": per_benchmark}


def format_table(summary):
    metrics = ["avg"] + [k for k in summary if k.startswith(("pass@", "maj@"))] + ["mean_length"]
    lines = [f"{'benchmark':<12}{'problems':>9}{'samples':>9}" + "".join(f"{m:>12}" for m in metrics)]
    for name, s in list(summary["benchmarks"].items()) + [("overall", summary)]:
        lines.append(f"{name:<12}{s['problems']:>9}{s['samples']:>9}" + "".join(f"{s[m]:>12.4f}" for m in metrics))
    return "\n".join(lines + [f"mean of the per-benchmark avg: {summary['avg_of_benchmarks']:.4f}"])


def write_curve(out_dir, curve):
    """The checkpoints' scores as a table (curve.md, curve.json) and a plot (curve.png, if matplotlib is installed)."""
    with open(os.path.join(out_dir, "curve.json"), "w") as f:
        json.dump(curve, f, indent=1)
    best = max(curve, key=lambda c: c["avg"])
    lines = ["| step | avg | pass@k (largest k) | maj@k | mean length |", "|---|---|---|---|---|"] + [
        f"| {c['step']}{' (best)' * (c is best)} | {c['avg']:.4f} | {c['pass']:.4f} | {c['maj']:.4f} | "
        f"{c['length']:.0f} |"
        for c in curve]
    with open(os.path.join(out_dir, "curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "\n".join(lines)
    plt.figure(figsize=(6, 3.5))
    plt.plot([c["step"] for c in curve], [c["avg"] for c in curve], marker="o")
    plt.xlabel("training step")
    plt.ylabel("avg")
    plt.title(f"best: step {best['step']}, avg {best['avg']:.4f}")
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(os.path.join(out_dir, "curve.png"), dpi=120)
    plt.close()
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# 9. the run

# the options that decide a problem's samples, kept beside the samples file (a resume with others is refused)
SAMPLE_SETTINGS = ("teacher_context", "temperature", "top_p", "sampling_top_k", "max_new_tokens", "thinking", "seed")


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")  # "bfloat16": JSON holds names, not torch dtypes


def load_problems(args):
    """The problems of --data, or of each --benchmarks key, each with its "benchmark" (the name it is reported
    under); only the fields this evaluation needs are required."""
    require = ["problem", "answer"]
    if args.teacher_context == "solution":
        require.append("solution")  # the teacher's prompt shows it
    if args.data:
        name = os.path.splitext(os.path.basename(args.data))[0]
        sources = [(name, args.data)]
    else:
        names = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
        if not names:
            raise prompts.UserError(f"--benchmarks {args.benchmarks!r} names no benchmark; give comma-separated keys "
                                    f"of {sorted(prompts.BENCHMARKS)} (or --data)")
        unknown = [name for name in names if name not in prompts.BENCHMARKS]
        if unknown:
            raise prompts.UserError(f"--benchmarks: unknown {unknown}; known: {sorted(prompts.BENCHMARKS)} (or --data)")
        twice = [name for name in dict.fromkeys(names) if names.count(name) > 1]
        if twice:  # its problems would be sampled twice and counted once
            raise prompts.UserError(f"--benchmarks: {', '.join(twice)} twice")
        sources = [(name, name) for name in names]
    records = []
    for name, source in sources:
        for record in prompts.load_records(source, None, require=tuple(require), limit=args.limit):
            records.append({**record, "benchmark": name})
    return records



def main(argv=None):
    # 1. config; the weights to evaluate: the base, an adapter (a run dir: its latest), or each checkpoint of a run,
    # all checked before anything loads
    args = plumbing.parse_config(get_parser(), argv)
    check_options(args)
    base_problem = model_problem(args.model)
    if base_problem:
        raise prompts.UserError(f"--model {args.model}: {base_problem}")
    if args.checkpoints:
        weights = checkpoints_to_evaluate(args.checkpoints)
    elif args.adapter:
        weights = [chosen_adapter(args.adapter)]
    else:
        weights = [None]  # the base model
    adapters = []
    full_models = []  # --checkpoints of a --full-finetune run: whole models
    for path in weights:
        if path is not None and is_adapter(path):
            adapters.append(path)
        elif path is not None:
            full_models.append(path)
    if full_models and args.sampler == "vllm":
        raise prompts.UserError(f"--sampler vllm: {args.checkpoints} is a --full-finetune run, and vLLM (it serves "
                                "--model, with adapters per call) cannot load a checkpoint's whole model; use "
                                "--sampler hf")

    # 2. torchrun: ranks split the problems
    rank, world, device = opsd.init_distributed()
    dtype = plumbing.compute_dtype(args.dtype, device)

    # 3. data, before any model loads: a broken row costs a second, and so does a prompt that leaves no room for
    # --max-new-tokens in the model's context
    records = load_problems(args)
    tokenizer = plumbing.load_tokenizer(args.model)
    room = plumbing.room_for_prompts(args, args.max_new_tokens, "--max-new-tokens")
    if room is not None:
        too_long = prompts.prompts_too_long(tokenizer, records, room, args.thinking, args.teacher_context)
        if too_long:
            record, tokens = too_long[0]
            raise prompts.UserError(f"{record['benchmark']}: problem {record['id']}: the prompt ({tokens:,} tokens) is "
                                    f"over the {room:,} that fit with --max-new-tokens {args.max_new_tokens} "
                                    f"({len(too_long)} problem(s) in all); lower --max-new-tokens")
    prompt_texts = [prompts.record_prompt_text(tokenizer, r, args.thinking, args.teacher_context) for r in records]
    max_model_len = prompts.most_tokens(tokenizer, prompt_texts)[1] + args.max_new_tokens  # vLLM's engine size
    lock = plumbing.claim_out_dir(args.out_dir, args.resume, args.overwrite, master=rank == 0)  # held until the end

    # 4-5. model (+ adapter) and sampler: vLLM serves the base with the adapter as a LoRARequest; HF loads it with
    # PEFT. A --full-finetune run's checkpoints go to HF: vLLM takes new weights per call only as adapters
    kind = samplers.sampler_kind(args.sampler, device, lora=not full_models)
    if kind == "vllm":
        model = None  # vLLM loads the base model itself, from --model
    else:
        # the model holds the first weights to evaluate; the later checkpoints are loaded into it one by one
        if full_models:
            model, _ = models.load_model(full_models[0], device, dtype)
        else:
            model, _ = models.load_model(args.model, device, dtype)
        if adapters:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, adapters[0])
    lora_rank = None
    if adapters:
        lora_rank = adapter_config(adapters[0])["r"]  # the largest adapter vLLM must make room for
    sampler = samplers.make_sampler(kind, model, tokenizer, args.model, device, dtype, lora_rank, args.seed,
                                    args.vllm_gpu_memory, world, sleep=False, max_model_len=max_model_len)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.sampling_top_k}
    plumbing.print0(f"{len(records)} problems x {args.samples} samples x {len(weights)} weights | {args.model} | "
                    f"T={args.temperature} top_p={args.top_p} thinking={args.thinking} | {type(sampler).__name__} | "
                    f"{world} ranks | writing to {args.out_dir}")

    # 6-7. sample, grade and summarise each set of weights (a finished one is skipped on --resume); 8. report
    largest_k = max(k for k in KS if k <= args.samples)  # the curve shows pass@k and maj@k at this k
    # a settings file from before the dtype and sampler were recorded: taken as written at their defaults (auto)
    default_dtype = plumbing.compute_dtype(args._defaults["dtype"], device)
    default_sampler = kind
    if args.sampler != args._defaults["sampler"]:
        default_sampler = samplers.sampler_kind(args._defaults["sampler"], device, lora=not full_models)
    older_defaults = {"dtype": dtype_name(default_dtype), "sampler": default_sampler}
    curve = []
    for path in weights:
        if args.checkpoints:
            out_dir = os.path.join(args.out_dir, os.path.basename(path))  # a directory per checkpoint
        else:
            out_dir = args.out_dir
        samples_path = os.path.join(out_dir, "samples.jsonl")
        summary_path = os.path.join(out_dir, "summary.json")
        finished = args.resume and args.checkpoints and os.path.exists(summary_path)
        if finished:
            with open(summary_path) as f:
                summary = json.load(f)
            plumbing.print0(f"eval: {path} done already, skipped")
        else:
            if sampler.kind == "hf" and path is not None and path != weights[0]:
                plumbing.load_weights(path, model)  # the model was loaded with the first weights
            lora_request = None  # vLLM gets the adapter with each call; HF has it loaded in the model
            if sampler.kind == "vllm" and path in adapters:
                lora_request = opsd.lora_request(path)
            # the dtype and the sampler as computed (auto: bf16 and vLLM on a GPU, fp32 and HF on CPU); each samples
            # differently from the same seed
            settings = {"model": args.model, "adapter": path, "data": args.data or args.benchmarks,
                        "dtype": dtype_name(dtype), "sampler": sampler.kind}
            for name in SAMPLE_SETTINGS:
                settings[name] = getattr(args, name)
            # a checkpoint's samples are always kept: the curve is resumable whether or not --resume is given
            resume = args.resume or bool(args.checkpoints)
            summary = run_eval(tokenizer, records, sampler, n=args.samples, sampling=sampling, thinking=args.thinking,
                               seed=args.seed, teacher_context=args.teacher_context, rank=rank, world=world,
                               out_path=samples_path, resume=resume, settings=settings,
                               older_defaults=older_defaults, batch_size=args.batch_size, lora_request=lora_request,
                               progress=True)
            if rank == 0:
                with open(summary_path, "w") as f:
                    json.dump({**summary, "config": plumbing.settings_of(args)}, f, indent=2)
                print(format_table(summary), flush=True)
                print(f"eval: samples in {samples_path}, summary in {summary_path}", flush=True)
        step = 0
        if path is not None:
            step = plumbing.checkpoint_step(path)
        curve.append({"step": step, "avg": summary["avg"], "pass": summary[f"pass@{largest_k}"],
                      "maj": summary[f"maj@{largest_k}"], "length": summary["mean_length"]})
    sampler.close()  # before the process group goes: vLLM's shutdown uses it
    if rank == 0 and args.checkpoints:
        print(write_curve(args.out_dir, curve), flush=True)
    if world > 1 and dist.is_initialized():  # (a vLLM engine's teardown may have destroyed it already)
        dist.destroy_process_group()
    if lock:  # closed here, not when this frame is collected (a kept traceback can hold it for a long time)
        lock.close()
    summary = {k: v for k, v in summary.items() if k != "config"}  # a summary.json read back holds the run's options
    if args.checkpoints:
        return {**summary, "curve": curve}
    return summary


if __name__ == "__main__":
    plumbing.run_script(main)

"""
Evaluate a base model or a trained adapter on the paper's benchmarks: avg@n, pass@k and maj@k.

  1. problems: AIME24, AIME25, HMMT Feb 25 and AMO-Bench (prompts.BENCHMARKS), or a local file;
  2. prompt: prompts.student_prompt_ids, the prompt training uses; thinking on, as in the paper;
  3. sample n completions per problem, many problems per sampler call: vLLM on GPU (the adapter as a
     LoRARequest, prompts as token ids), HF generate on CPU (the adapter loaded with PEFT);
  4. grade: the last \\boxed{} against the gold answer (prompts.grade: math-verify + normalised compare);
  5. per problem, c correct of n: avg@n = c / n; pass@k = 1 - C(n-c, k) / C(n, k) (unbiased, Chen et al.
     2021); maj@k = is the most frequent normalised answer among the first k samples right;
     then means per benchmark and over the problems of all benchmarks.
Every sample is appended to samples.jsonl as soon as its problem is done, so a stopped run keeps its work
and `--resume` samples only what is missing (and gives the same summary). `run_eval` is also the
periodic eval of the training scripts (common.end_step).

Departures from the official OPSD eval code:
  - the prompt is the training prompt (the official code worded its training and eval prompts differently);
  - grading parses only the last \\boxed{} (LaTeX-only) where math-verify's default also grades unboxed
    text; AMO-Bench rows whose answer needs an LLM judge are dropped (prompts.load_records);
  - temperature 1.2 as in the paper; the official README used 1.0 (`--temperature 1.0`).

Run:
  python eval.py                                                    # Qwen3-1.7B base, 1 GPU (vLLM), 16 samples
  python eval.py --adapter runs/opsd/checkpoint-000100 --out-dir runs/eval/opsd-100   # a trained adapter
  python eval.py --model runs/sft-full/checkpoint-000100            # a --full-finetune run: a whole model
  torchrun --standalone --nproc_per_node 8 eval.py --adapter runs/opsd   # 8 GPUs, problems split by rank
  python eval.py --preset toy [--adapter runs/toy/opsd]             # CPU toy world: greedy, 256 test problems
  python eval.py --preset toy --teacher                             # the toy teacher: reference in the prompt
"""
import argparse
import glob
import json
import math
import os
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import opsd
import prompts

# -----------------------------------------------------------------------------
# 1. config


def get_parser():
    parser = argparse.ArgumentParser(description="avg@n / pass@k / maj@k of a model or adapter on math benchmarks",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=["toy"], default=None, help="'toy': the CPU toy world's warm start and test set (toy.py); explicit flags still override it")
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="Qwen/Qwen3-1.7B", help="HF id or local directory of the base model (or of a --full-finetune checkpoint)")
    group.add_argument("--adapter", default=None, help="a PEFT adapter dir (a checkpoint-NNNNNN of opsd.py/grpo.py/sft.py), or a run dir: its latest checkpoint")
    group = parser.add_argument_group("data")
    group.add_argument("--benchmarks", default="aime24,aime25,hmmt25,amobench", help=f"comma-separated keys of prompts.BENCHMARKS ({', '.join(prompts.BENCHMARKS)})")
    group.add_argument("--data", default=None, help="a local .jsonl/.json/.parquet with problem/answer columns, instead of --benchmarks")
    group.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    group.add_argument("--teacher", action="store_true", help="prompt with the reference solution too (the teacher's view; needs a solution column)")
    group = parser.add_argument_group("sampling")
    group.add_argument("--n", type=int, default=16, help="samples per problem")
    group.add_argument("--temperature", type=float, default=1.2, help="sampling temperature (paper: 1.2; official README: 1.0; 0: greedy)")
    group.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling")
    group.add_argument("--max-new-tokens", type=int, default=38912, help="completion length limit")
    group.add_argument("--no-thinking", dest="thinking", action="store_false", help="Qwen3 thinking mode off (an empty <think></think> block)")
    group.add_argument("--sampler", choices=["auto", "hf", "vllm"], default="auto", help="auto: vLLM on GPU when installed, else HF generate")
    group.add_argument("--batch-size", type=int, default=64, help="problems per sampler call (x n sequences)")
    group.add_argument("--vllm-gpu-memory", type=float, default=0.9, help="fraction of GPU memory vLLM may take")
    group.add_argument("--seed", type=int, default=0, help="sampling seed")
    group = parser.add_argument_group("output")
    group.add_argument("--out-dir", default="runs/eval", help="samples.jsonl and summary.json go here")
    group.add_argument("--resume", action="store_true", help="keep the samples already in --out-dir/samples.jsonl and sample only the missing ones")
    return parser


def parse_args(argv=None):
    parser = get_parser()
    args = opsd.parse_config(parser, "eval", argv)  # applies --preset toy; explicit flags still win
    if args.n < 1 or args.batch_size < 1:
        parser.error(f"--n and --batch-size must be positive, got {args.n} and {args.batch_size}")
    return args

# -----------------------------------------------------------------------------
# 2. metrics: plain functions of the graded samples


KS = (1, 2, 4, 8, 16)


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), as the product
    prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(answers, correct, k):
    """Majority vote over the normalised answers of the first k samples (no answer: no vote); right if
    the winning answer is. Ties go to the answer seen first (Counter keeps insertion order)."""
    keys = [None if a is None else prompts.normalize_answer(a) for a in answers[:k]]
    votes = Counter(key for key in keys if key is not None)
    if not votes:
        return 0.0
    winner = max(votes, key=votes.get)  # max returns the first of equal counts
    return float(correct[keys.index(winner)])


def problem_metrics(samples, ks):
    """One problem's sums: samples, correct, length, pass@k, maj@k; samples are rows in sample order."""
    n, c = len(samples), sum(s["correct"] for s in samples)
    answers, correct = [s["extracted"] for s in samples], [s["correct"] for s in samples]
    return {"problems": 1, "samples": n, "correct": c, "length": sum(s["length"] for s in samples),
            **{f"pass@{k}": pass_at_k(n, c, k) for k in ks}, **{f"maj@{k}": maj_at_k(answers, correct, k) for k in ks}}


def summarize(sums, ks):
    """Means from summed per-problem metrics: avg (over samples), pass@k and maj@k (over problems), mean length."""
    problems, samples = max(sums["problems"], 1), max(sums["samples"], 1)
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
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        sums = sums.to(device)
        dist.all_reduce(sums)  # a sum, not a mean: ranks hold different numbers of problems
        sums = sums.cpu()
    per_benchmark = {b: summarize(dict(zip(fields, row.tolist())), ks) for b, row in zip(benchmarks, sums)}
    summary = summarize(dict(zip(fields, sums.sum(0).tolist())), ks)  # overall: every problem weighs the same
    summary["avg_of_benchmarks"] = sum(s["avg"] for s in per_benchmark.values()) / len(per_benchmark)
    summary["benchmarks"] = per_benchmark
    return summary

# -----------------------------------------------------------------------------
# 3. samples.jsonl: one line per sample, appended as problems finish; each rank writes its own file


def rank_path(out_path, rank, world):
    root, ext = os.path.splitext(out_path)
    return out_path if world == 1 else f"{root}.rank{rank}{ext}"


def read_samples(path, truncate=False):
    """The complete lines of a samples file. A run killed mid-write leaves a last line without its newline:
    it is skipped, and cut off when `truncate` (the file is then appended to)."""
    rows, good_bytes = [], 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not valid JSON ({e}); delete the file or drop --resume") from e
            good_bytes += len(line)
    if truncate:
        os.truncate(path, good_bytes)
    return rows


def finished_samples(out_path, rank, world):
    """(benchmark, problem_id, sample) -> row, from every samples file of the run (any earlier world size)."""
    root, ext = os.path.splitext(out_path)
    own = rank_path(out_path, rank, world)
    done = {}
    for path in [out_path] + sorted(glob.glob(f"{root}.rank*{ext}")):
        if os.path.exists(path):
            for row in read_samples(path, truncate=path == own):
                done[(row["benchmark"], row["problem_id"], row["sample"])] = row
    return done

# -----------------------------------------------------------------------------
# 4. run_eval: sample, grade, write, summarize (also called by the training scripts)


def problem_key(record):
    return record.get("benchmark", "data"), record["id"]


def run_eval(model, tokenizer, records, sampler, n, temperature, top_p, max_new_tokens, thinking, rank=0, world=1,
             out_path=None, resume=False, teacher=False, *, batch_size=64, progress=False) -> dict:
    """Evaluate `records` (prompts.load_records dicts; an optional "benchmark" key groups them) with n samples
    per problem from `sampler`, which holds the weights: `model` is not used here, the caller picks what the
    sampler samples from (e.g. `with model.disable_adapter():` for the toy teacher). With world > 1 this rank
    does problems range(rank, N, world) and the sums are all-reduced: every rank returns the same summary."""
    ks = [k for k in KS if k <= n]
    benchmarks = list(dict.fromkeys(problem_key(r)[0] for r in records))  # same order on every rank
    mine = [records[i] for i in range(rank, len(records), world)]
    done, file = {}, None
    if out_path:
        root, ext = os.path.splitext(out_path)
        if resume:
            done = finished_samples(out_path, rank, world)
        elif rank == 0:  # a fresh run: samples left by an earlier run must not be resumed later
            for stale in [out_path] + glob.glob(f"{root}.rank*{ext}"):
                if os.path.exists(stale):
                    os.remove(stale)
        if world > 1:
            dist.barrier()  # every rank has read (or rank 0 has cleared) the files before any is written
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        file = open(rank_path(out_path, rank, world), "a", encoding="utf-8")
    results = {}  # (benchmark, problem_id) -> {sample index: row}
    for record in mine:
        key = problem_key(record)
        results[key] = {s: done[key + (s,)] for s in range(n) if key + (s,) in done}
    todo = [r for r in mine if len(results[problem_key(r)]) < n]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="eval", disable=not progress or rank != 0, file=sys.stdout)
    kept = [row for rows in results.values() for row in rows.values()]
    n_new, n_graded, n_correct, t0 = 0, len(kept), sum(row["correct"] for row in kept), time.time()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        if teacher:
            for r in chunk:
                if r.get("solution") is None:
                    raise ValueError(f"teacher eval: record {problem_key(r)} has no solution")
            prompt_ids = [prompts.teacher_prompt_ids(tokenizer, r["problem"], r["solution"], thinking) for r in chunk]
        else:
            prompt_ids = [prompts.student_prompt_ids(tokenizer, r["problem"], thinking) for r in chunk]
        completions = sampler.generate(prompt_ids, n, max_new_tokens, temperature, top_p)
        for record, samples in zip(chunk, completions):
            key = problem_key(record)
            for s, ids in enumerate(samples):
                if s in results[key]:
                    continue  # kept from the stopped run
                text = tokenizer.decode(ids, skip_special_tokens=True)
                # the whole completion, thinking included, is graded: the answer is its last box.
                # prompts.grade bounds math-verify with a worker subprocess and a hard timeout, so one
                # pathological answer cannot stall the run; no pool of our own is needed
                row = {"benchmark": key[0], "problem_id": key[1], "sample": s, "completion": text,
                       "extracted": prompts.extract_boxed(text), "correct": prompts.grade(text, record["answer"]),
                       "length": len(ids)}
                results[key][s] = row
                n_new, n_correct, n_graded = n_new + 1, n_correct + row["correct"], n_graded + 1
                if file:
                    file.write(json.dumps(row) + "\n")
            if file:
                file.flush()  # per problem: a stopped run keeps every problem it finished
            bar.update(1)
            bar.set_postfix_str(f"{n_new / max(time.time() - t0, 1e-9):.1f} samples/s | acc {n_correct / max(n_graded, 1):.3f}", refresh=False)
    bar.close()
    if file:
        file.close()
    per_problem = {key: problem_metrics([rows[s] for s in range(n)], ks) for key, rows in results.items()}
    return reduce_summary(per_problem, benchmarks, ks, world)

# -----------------------------------------------------------------------------
# 5. model and sampler: vLLM serves the base with the adapter as a LoRARequest; HF loads the adapter with PEFT


def resolve_adapter(path):
    path = common.follow_latest(path)  # a run dir: its latest checkpoint
    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"--adapter {path}: no adapter_config.json there (for a --full-finetune run pass the checkpoint as --model)")
    return path


def load_hf_model(model_path, adapter, device):
    # full_finetune=True: opsd.load_model then adds no fresh LoRA of its own
    model, _ = opsd.load_model(argparse.Namespace(model=model_path, full_finetune=True, grad_checkpointing=False), device)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def make_eval_sampler(args, tokenizer, rank, world, device):
    lora_rank = 8  # no adapter: vLLM still needs a rank; it serves the base weights
    if args.adapter:
        with open(os.path.join(args.adapter, "adapter_config.json")) as f:
            lora_rank = json.load(f)["r"]
    config = argparse.Namespace(model=args.model, lora_r=lora_rank, full_finetune=False,  # VLLMSampler rounds it up
                                seed=args.seed, vllm_gpu_memory=args.vllm_gpu_memory, out_dir=args.out_dir, sampler=args.sampler)
    sampler = opsd.make_sampler(config, None, tokenizer, rank, world, device)
    if not isinstance(sampler, opsd.VLLMSampler):
        sampler.update(load_hf_model(args.model, args.adapter, device), 0)
    elif args.adapter:  # one fixed adapter: one LoRARequest id for the whole run
        from vllm.lora.request import LoRARequest
        sampler.lora = LoRARequest("eval", 1, os.path.abspath(args.adapter))
    return sampler


def format_table(summary):
    metrics = ["avg"] + [k for k in summary if k.startswith(("pass@", "maj@"))] + ["mean_length"]
    lines = [f"{'benchmark':<12}{'problems':>9}{'samples':>9}" + "".join(f"{m:>12}" for m in metrics)]
    for name, s in list(summary["benchmarks"].items()) + [("overall", summary)]:
        lines.append(f"{name:<12}{s['problems']:>9}{s['samples']:>9}" + "".join(f"{s[m]:>12.4f}" for m in metrics))
    lines.append(f"mean of the per-benchmark avg: {summary['avg_of_benchmarks']:.4f}")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# 6. main


def main(argv=None):
    # 1. config, distributed init
    args = parse_args(argv)
    rank, world, device = common.init_distributed()
    torch.manual_seed(args.seed + rank)  # HF sampling draws from the global RNG
    # 2. data, first: a broken row fails before any model is loaded
    require = ("problem", "answer", "solution") if args.teacher else ("problem", "answer")
    if args.data:
        sources = [(os.path.splitext(os.path.basename(args.data))[0], args.data)]
    else:
        sources = [(name.strip(), name.strip()) for name in args.benchmarks.split(",") if name.strip()]
        unknown = [name for name, _ in sources if name not in prompts.BENCHMARKS]
        if unknown:
            raise ValueError(f"--benchmarks: unknown {unknown}; known: {sorted(prompts.BENCHMARKS)} (or use --data FILE)")
    records = [{**r, "benchmark": name} for name, source in sources
               for r in prompts.load_records(source, None, require=require, limit=args.limit)]
    if not records:
        raise ValueError(f"no problems to evaluate in {[s for _, s in sources]}")
    # 3. model + sampler
    args.adapter = resolve_adapter(args.adapter) if args.adapter else None
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sampler = make_eval_sampler(args, tokenizer, rank, world, device)
    common.print0(f"{len(records)} problems x {args.n} samples | {args.model}" + (f" + {args.adapter}" if args.adapter else "")
                  + f" | T={args.temperature} top_p={args.top_p} thinking={args.thinking} | {type(sampler).__name__} | {world} ranks")
    # 4. sample, grade, summarize
    summary = run_eval(getattr(sampler, "model", None), tokenizer, records, sampler, args.n, args.temperature, args.top_p,
                       args.max_new_tokens, args.thinking, rank, world, out_path=os.path.join(args.out_dir, "samples.jsonl"),
                       resume=args.resume, teacher=args.teacher, batch_size=args.batch_size, progress=True)
    # 5. report
    if rank == 0:
        with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
            json.dump({**summary, "config": vars(args)}, f, indent=2)
        print(format_table(summary), flush=True)
    if world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()

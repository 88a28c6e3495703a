"""
Evaluate a base model or a trained adapter on the paper's benchmarks: avg@n, pass@k and maj@k.

  1. problems: AIME24, AIME25, HMMT Feb 25 and AMO-Bench (prompts.BENCHMARKS), or a local file;
  2. prompt: prompts.student_prompt_ids, the prompt training uses (thinking on, as in the paper), or the OPSD
     teacher's prompt with --teacher-context;
  3. sample n completions per problem, many problems per sampler call: vLLM on GPU (the adapter as a
     LoRARequest, prompts as token ids), HF generate on CPU (the adapter loaded with PEFT);
  4. grade the last \\boxed{} against the gold answer (prompts.grade: math-verify + normalised compare);
  5. per problem, avg@n, pass@k (unbiased) and maj@k; means per benchmark and over all problems (lm.run_eval).
Samples are appended to samples.jsonl after every sampler call, so a kill loses at most the call in flight
(--batch-size problems x --samples samples) and `--resume` samples only what is missing, with the same summary.

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
  python eval.py --preset toy --teacher-context solution            # the toy teacher: reference in the prompt
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

import common
import lm
import prompts

# -----------------------------------------------------------------------------
# options


def get_parser():
    parser = argparse.ArgumentParser(description="avg@n / pass@k / maj@k of a model or adapter on math benchmarks",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.presets = common.presets_for("eval")
    parser.add_argument("--preset", choices=sorted(parser.presets), default=None, help="toy: the CPU toy world's warm start and test set (toy.py); flags given on the command line still win")
    common.model_options(parser, lora=False).add_argument(
        "--adapter", default=None, help="a PEFT adapter dir (a checkpoint-NNNNNN of opsd.py/grpo.py/sft.py), or a run dir: its latest checkpoint")
    group = parser.add_argument_group("data")
    group.add_argument("--benchmarks", default="aime24,aime25,hmmt25,amobench", help=f"comma-separated keys of prompts.BENCHMARKS ({', '.join(prompts.BENCHMARKS)})")
    group.add_argument("--data", default=None, help="a local .jsonl/.json/.parquet with problem/answer columns, instead of --benchmarks")
    group.add_argument("--limit", type=common.positive_int, default=None, help="only the first N problems of each benchmark")
    group.add_argument("--teacher-context", choices=sorted(prompts.TEACHER_CONTEXTS), default=None, help="prompt as the OPSD teacher, with this privileged context (the reference solution, or only its answer); default: the student prompt")
    group = common.sampling_options(parser, temperature=1.2, max_new_tokens=38912, gpu_memory=0.9)
    group.add_argument("--samples", type=common.positive_int, default=16, help="samples per problem, n in avg@n (not --n: under torchrun that is an ambiguous prefix of torchrun's own options)")
    group.add_argument("--batch-size", type=common.positive_int, default=64, help="problems per sampler call (x --samples sequences); also what a kill can lose")
    parser.set_defaults(top_p=0.95, thinking=True)  # the paper's evaluation: thinking on, top-p 0.95
    group = parser.add_argument_group("output")
    group.add_argument("--out-dir", default="runs/eval", help="samples.jsonl and summary.json go here; it must be empty unless --resume or --overwrite")
    group.add_argument("--overwrite", action="store_true", help="delete an earlier evaluation's files from --out-dir first")
    group.add_argument("--resume", action="store_true", help="keep the samples already in --out-dir/samples.jsonl and sample only the missing ones (same model and settings only)")
    return parser


def resolve_adapter(path):
    path = common.follow_latest(path, option="--adapter")  # a run dir: its latest checkpoint
    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        raise prompts.UserError(f"--adapter {path}: no adapter_config.json there (for a --full-finetune run pass the checkpoint as --model)")
    return path


def format_table(summary):
    metrics = ["avg"] + [k for k in summary if k.startswith(("pass@", "maj@"))] + ["mean_length"]
    lines = [f"{'benchmark':<12}{'problems':>9}{'samples':>9}" + "".join(f"{m:>12}" for m in metrics)]
    for name, s in list(summary["benchmarks"].items()) + [("overall", summary)]:
        lines.append(f"{name:<12}{s['problems']:>9}{s['samples']:>9}" + "".join(f"{s[m]:>12.4f}" for m in metrics))
    lines.append(f"mean of the per-benchmark avg: {summary['avg_of_benchmarks']:.4f}")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    # 1. config
    args = common.parse_config(get_parser(), argv)
    adapter = resolve_adapter(args.adapter) if args.adapter else None
    # 2. distributed init: ranks split the problems
    rank, world, device = common.init_distributed()
    torch.manual_seed(args.seed + rank)  # HF sampling draws from the global RNG
    # 3. data, before any model loads: a broken row costs a second
    require = ("problem", "answer") + (("solution",) if args.teacher_context == "solution" else ())
    if args.data:
        sources = [(os.path.splitext(os.path.basename(args.data))[0], args.data)]
    else:
        sources = [(name.strip(), name.strip()) for name in args.benchmarks.split(",") if name.strip()]
        unknown = [name for name, _ in sources if name not in prompts.BENCHMARKS]
        if unknown:
            raise prompts.UserError(f"--benchmarks: unknown {unknown}; known: {sorted(prompts.BENCHMARKS)} (or use --data FILE)")
    records = [{**r, "benchmark": name} for name, source in sources
               for r in prompts.load_records(source, None, require=require, limit=args.limit)]
    lock = common.claim_out_dir(args.out_dir, args.resume, args.overwrite, master=rank == 0)  # noqa: F841 (held for the run)
    # 4-5. model (+ adapter) and sampler: vLLM serves the base with the adapter as a LoRARequest; HF loads it with PEFT
    lora_rank = json.load(open(os.path.join(adapter, "adapter_config.json")))["r"] if adapter else None
    kind = lm.sampler_kind(args.sampler, device, lora=True)
    model, tokenizer = (None, None) if kind == "vllm" else lm.load_model(args.model, device)
    if kind == "vllm":
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    elif adapter:
        model = lm.load_adapter(model, adapter)
    sampler = lm.make_sampler(kind, model=model, tokenizer=tokenizer, model_path=args.model, device=device,
                              lora_rank=lora_rank, seed=args.seed, vllm_gpu_memory=args.vllm_gpu_memory,
                              adapter_dir=None, rank=rank, world=world, vllm_sleep=False)
    if kind == "vllm" and adapter:
        sampler.use_adapter(adapter, 1)  # one fixed adapter: one LoRARequest id for the whole run
    samples_path = os.path.join(args.out_dir, "samples.jsonl")
    common.print0(f"{len(records)} problems x {args.samples} samples | {args.model}" + (f" + {adapter}" if adapter else "")
                  + f" | T={args.temperature} top_p={args.top_p} thinking={args.thinking} | {type(sampler).__name__} | "
                  f"{world} ranks | writing to {samples_path}")
    # 6. sample, grade, summarise
    settings = {"model": args.model, "adapter": adapter, "data": args.data or args.benchmarks,
                **{k: getattr(args, k) for k in ("teacher_context", "temperature", "top_p", "sampling_top_k", "max_new_tokens", "thinking", "seed")}}
    summary = lm.run_eval(tokenizer, records, sampler, n=args.samples, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, thinking=args.thinking, teacher_context=args.teacher_context,
                          rank=rank, world=world, out_path=samples_path, resume=args.resume, settings=settings,
                          batch_size=args.batch_size, progress=True)
    sampler.close()  # before the process group goes: vLLM's shutdown uses it
    # 7. report
    if rank == 0:
        with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
            json.dump({**summary, "config": vars(args)}, f, indent=2)
        print(format_table(summary), flush=True)
        print(f"eval: samples in {samples_path}, summary in {os.path.join(args.out_dir, 'summary.json')}", flush=True)
    if world > 1 and dist.is_initialized():  # (a vLLM engine's teardown may have destroyed it already)
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    common.run_script(main)

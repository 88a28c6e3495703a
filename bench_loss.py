"""
Peak memory and time of the OPSD loss, forward + backward w.r.t. the student's hidden states:
lm.chunked_loss with opsd.opsd_token_fn (logits made chunk_size positions at a time, used and freed)
against the naive full-logits way of the official code (student and teacher T x V logits at once,
generalized JSD over (T, V), mean, backward).

Each variant runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. Both build the same
seeded inputs; the baseline is the RSS once the inputs exist, and "loss memory" = peak - baseline.
Both save their loss and gradient, and the parent compares them.

  python bench_loss.py                                  # T=2048, H=2048, V=151,936, fp32 CPU (~14 GB peak, ~4 min)
  python bench_loss.py --T 256 --H 256 --V 32000        # a quick check
  python bench_loss.py --chunk-size 128 256 1024        # one naive run, several chunk sizes
"""
import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

import lm
import opsd

# -----------------------------------------------------------------------------
# 1. config


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--T", type=int, default=2048, help="positions (rollout tokens) in the batch")
    parser.add_argument("--H", type=int, default=2048, help="hidden size (Qwen3-1.7B: 2048)")
    parser.add_argument("--V", type=int, default=151_936, help="vocabulary size (Qwen3: 151,936)")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD_beta (0: forward KL, 1: reverse KL)")
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[128],
                        help="positions per chunk for the chunked variant; several values run one chunked subprocess each")
    parser.add_argument("--repeats", type=int, default=1, help="forward+backward passes per variant; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (the same in every subprocess)")
    parser.add_argument("--variant", choices=["naive", "chunked"], default=None, help="internal: run one variant in this process")
    parser.add_argument("--result", default=None, help="internal: where the --variant process saves its numbers")
    return parser

# -----------------------------------------------------------------------------
# 2. one variant, in its own process


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def make_inputs(args):
    # logits ~ N(0, 2.3^2), as a trained LM's roughly are; the teacher's hidden states are the student's
    # plus noise (same model, a different context), so the two distributions differ but not wildly.
    # Scaled in place: a temporary copy of the 1.2 GB weight would raise the baseline RSS above the inputs.
    generator = torch.Generator().manual_seed(args.seed)
    student_hidden = torch.randn(args.T, args.H, generator=generator)
    teacher_hidden = torch.randn(args.T, args.H, generator=generator).mul_(0.5).add_(student_hidden)
    weight = torch.randn(args.V, args.H, generator=generator).mul_(0.05)
    targets = torch.randint(args.V, (args.T,), generator=generator)
    return student_hidden, teacher_hidden, weight, targets


def naive_loss(student_hidden, teacher_hidden, weight, beta):
    student_logits = student_hidden @ weight.T  # (T, V)
    with torch.no_grad():
        teacher_logits = teacher_hidden @ weight.T  # (T, V)
    return opsd.generalized_jsd(student_logits, teacher_logits, beta).mean()


def chunked_loss(student_hidden, teacher_hidden, weight, targets, beta, chunk_size):
    token_weights = torch.full((len(targets),), 1.0 / len(targets))  # the mean over positions
    return lm.chunked_loss(student_hidden, weight, token_weights, opsd.opsd_token_fn(weight, temperature=1.0, beta=beta),
                           (teacher_hidden, targets), chunk_size)


def run_variant(args):
    student_hidden, teacher_hidden, weight, targets = make_inputs(args)
    baseline = peak_rss_gb()
    times = []
    for _ in range(args.repeats):
        hidden = student_hidden.clone().requires_grad_()
        t0 = time.perf_counter()
        if args.variant == "naive":
            loss = naive_loss(hidden, teacher_hidden, weight, args.beta)
        else:
            loss = chunked_loss(hidden, teacher_hidden, weight, targets, args.beta, args.chunk_size[0])
        loss.backward()
        times.append(time.perf_counter() - t0)
        result = {"loss": loss.item(), "grad": hidden.grad}
        del loss, hidden
    torch.save({**result, "times": times, "baseline_gb": baseline, "peak_gb": peak_rss_gb()}, args.result)

# -----------------------------------------------------------------------------
# 3. the parent: one subprocess per variant, then the table


def spawn(args, variant, chunk_size, result):
    command = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--result", result,
               "--T", str(args.T), "--H", str(args.H), "--V", str(args.V), "--beta", str(args.beta),
               "--chunk-size", str(chunk_size), "--repeats", str(args.repeats), "--seed", str(args.seed)]
    subprocess.run(command, check=True)
    return torch.load(result)


def main():
    args = get_parser().parse_args()
    if args.variant:
        return run_variant(args)
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {platform.node()} | {os.cpu_count()} CPUs (nproc), "
          f"{memory_gb:.1f} GiB RAM | torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"T={args.T} H={args.H} V={args.V} beta={args.beta} fp32 | forward + backward w.r.t. the student hidden "
          f"states | repeats={args.repeats} (fastest reported)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"naive": spawn(args, "naive", args.chunk_size[0], os.path.join(tmp, "naive.pt"))}
        for chunk_size in args.chunk_size:
            results[f"chunked {chunk_size}"] = spawn(args, "chunked", chunk_size, os.path.join(tmp, f"chunked{chunk_size}.pt"))
    naive = results["naive"]
    print(f"\n{'variant':<14} {'time s':>8} {'peak RSS GB':>12} {'baseline GB':>12} {'loss mem GB':>12} "
          f"{'loss':>12} {'|dloss|':>9} {'max|dgrad|':>10}")
    for name, r in results.items():
        loss_memory = r["peak_gb"] - r["baseline_gb"]
        print(f"{name:<14} {min(r['times']):>8.2f} {r['peak_gb']:>12.2f} {r['baseline_gb']:>12.2f} {loss_memory:>12.2f} "
              f"{r['loss']:>12.6f} {abs(r['loss'] - naive['loss']):>9.1e} {(r['grad'] - naive['grad']).abs().max().item():>10.1e}")
    naive_memory = naive["peak_gb"] - naive["baseline_gb"]
    for name, r in results.items():
        if name != "naive":
            print(f"{name}: memory chunked/naive {(r['peak_gb'] - r['baseline_gb']) / naive_memory:.3f} (target <= 0.1), "
                  f"time chunked/naive {min(r['times']) / min(naive['times']):.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()

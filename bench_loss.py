"""
Time and peak memory of OPSD's loss, forward + backward w.r.t. the student's hidden states, against its floor.

The floor is the three matrix products every chunked JSD must do, chunk by chunk: the student's logits, the teacher's
logits, and the gradient w.r.t. the student's hidden states (the lm_head is frozen, as under LoRA). The variants:
  floor     those three GEMMs alone, at the same chunk size, into outputs allocated once;
  eager     opsd.chunked_loss_backward with opsd.opsd_token_loss, the per-token loss and its gradient in eager PyTorch;
  compiled  the same with the per-token loss and its gradient in torch.compile (what the scripts run by default);
  naive     the official code's way: both T x V logit matrices at once, the JSD over (T, V), mean, backward;
  liger     Liger's LigerFusedLinearJSDLoss (the chunked, compiled loss TRL uses), where liger-kernel is installed.
Each variant runs in its own subprocess (its peak RSS is its own) on the same seeded inputs, --repeats times: the first
call of a compiled variant compiles, so "time" is the fastest later call and "first" the first one. Loss and gradient
are compared with the eager variant's. Run it alone: two torch processes on 2 cores slow each other 10x or more.

  python bench_loss.py                               # T = 512 and 2048, H = 2048, V = 151,936, fp32 (~25 min)
  python bench_loss.py --T 256 --H 256 --V 32000     # a quick check
  python bench_loss.py --smoke                       # CI: tiny sizes, every variant runs (no timing claims)
"""
import argparse
import datetime
import importlib.util
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

import opsd

VARIANTS = ["floor", "eager", "compiled", "naive", "liger"]


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[512, 2048], help="positions (rollout tokens): a run each")
    parser.add_argument("--H", type=int, default=2048, help="hidden size (Qwen3-1.7B: 2048)")
    parser.add_argument("--V", type=int, default=151_936, help="vocabulary size (Qwen3: 151,936)")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD_beta (0: forward KL, 1: reverse KL)")
    parser.add_argument("--chunk-size", type=int, default=128, help="positions per chunk (the scripts' default)")
    parser.add_argument("--liger-chunk-size", type=int, nargs="+", default=[128, 1024], help="Liger's chunk sizes")
    parser.add_argument("--repeats", type=int, default=3, help="calls per variant; the fastest is kept")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants to run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats (CI)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (the same in every subprocess)")
    parser.add_argument("--variant", default=None, help="internal: run one variant in this process")
    parser.add_argument("--result", default=None, help="internal: where the --variant process saves its numbers")
    return parser


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def make_inputs(T, H, V, seed):
    # logits ~ N(0, 2.3^2), as a trained LM's roughly are; the teacher's hidden states are the student's plus noise
    # (the same model in another context). Scaled in place: a copy of the 1.2 GB weight would raise the baseline.
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(T, H, generator=generator)
    teacher_hidden = torch.randn(T, H, generator=generator).mul_(0.5).add_(student_hidden)
    weight = torch.randn(V, H, generator=generator).mul_(0.05)
    return student_hidden, teacher_hidden, weight, torch.randint(V, (T,), generator=generator)


def floor(hidden, teacher_hidden, weight, targets, args):
    """The three GEMMs per chunk and nothing else, into outputs allocated once (as fast as the three can be done)."""
    grad = torch.empty_like(hidden)
    student_logits, teacher_logits = (torch.empty(args.chunk_size, weight.shape[0]) for _ in range(2))
    with torch.no_grad():
        for start in range(0, len(targets), args.chunk_size):
            rows = slice(start, start + args.chunk_size)
            n = len(targets[rows])
            torch.mm(hidden[rows], weight.T, out=student_logits[:n])
            torch.mm(teacher_hidden[rows], weight.T, out=teacher_logits[:n])
            torch.mm(student_logits[:n], weight, out=grad[rows])  # a (C, V) @ (V, H) product, as grad_logits @ W
    hidden.backward(grad)  # a leaf: only stores it
    return torch.zeros(())


LOSS_GRAD = {compile: opsd.loss_and_gradient(opsd.opsd_token_loss, compile) for compile in (False, True)}


def ours(hidden, teacher_hidden, weight, targets, args, compile):
    token_weights = torch.full((len(targets),), 1.0 / len(targets))  # the mean over positions
    options = opsd.get_parser().parse_args(["--beta", str(args.beta), "--chunk-size", str(args.chunk_size),
                                            "--temperature", "1.0"])
    # the teacher's head is the student's, as under LoRA
    return opsd.chunked_loss_backward(hidden, teacher_hidden, weight, weight, targets, token_weights,
                                      LOSS_GRAD[compile], options)[0]


def naive(hidden, teacher_hidden, weight, targets, args):
    logp_student = (hidden @ weight.T).log_softmax(-1)  # (T, V)
    with torch.no_grad():
        logp_teacher = (teacher_hidden @ weight.T).log_softmax(-1)  # (T, V)
    loss = opsd.generalized_jsd(logp_student, logp_teacher, args.beta).mean()
    loss.backward()
    return loss


def liger(hidden, teacher_hidden, weight, targets, args, chunk_size):
    """Liger's fused linear JSD, its distillation term alone (no hard loss): beta=0 is KL(p_T || p_S) and m =
    beta p_T + (1 - beta) p_S there too, checked below (its loss must equal eager's); it averages over positions."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    if not hasattr(liger, "loss"):
        liger.loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=args.beta,
                                             temperature=1.0, compiled=True, chunk_size=chunk_size)
    loss = liger.loss(hidden, weight, teacher_hidden, weight, targets)
    loss.backward()
    return loss


def run_variant(args):
    name, _, chunk = args.variant.partition(":")
    student_hidden, teacher_hidden, weight, targets = make_inputs(args.T[0], args.H, args.V, args.seed)
    baseline, times = peak_rss_gb(), []
    fn = {"floor": floor, "eager": lambda *a: ours(*a, compile=False), "compiled": lambda *a: ours(*a, compile=True),
          "naive": naive, "liger": lambda *a: liger(*a, chunk_size=int(chunk or 1024))}[name]
    for _ in range(args.repeats):
        hidden = student_hidden.clone().requires_grad_()
        t0 = time.perf_counter()
        loss = fn(hidden, teacher_hidden, weight, targets, args)
        times.append(time.perf_counter() - t0)
        result = {"loss": loss.item(), "grad": hidden.grad}
    torch.save({**result, "times": times, "baseline_gb": baseline, "peak_gb": peak_rss_gb()}, args.result)


def spawn(args, T, variant, tmp):
    result = os.path.join(tmp, f"{variant}.pt")
    command = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--result", result, "--T", str(T),
               "--H", str(args.H), "--V", str(args.V), "--beta", str(args.beta), "--chunk-size", str(args.chunk_size),
               "--repeats", str(args.repeats), "--seed", str(args.seed)]
    if subprocess.run(command).returncode:
        return None
    return torch.load(result)


def table(args, T):
    variants = [v for v in args.variants.split(",") if v in VARIANTS]
    if "liger" in variants:
        variants.remove("liger")
        if importlib.util.find_spec("liger_kernel"):
            variants += [f"liger:{c}" for c in args.liger_chunk_size]
        else:
            print("liger-kernel is not installed: no Liger row (pip install liger-kernel)")
    with tempfile.TemporaryDirectory() as tmp:
        results = {v: spawn(args, T, v, tmp) for v in variants}
    results = {v: r for v, r in results.items() if r is not None}
    reference, floor_time = results.get("eager"), min(results["floor"]["times"]) if "floor" in results else None
    lines = [f"T={T} H={args.H} V={args.V} beta={args.beta} chunk {args.chunk_size} fp32, forward + backward",
             "", "| variant | time (s) | x floor | first call (s) | peak RSS (GB) | loss memory (GB) | loss | "
             "max abs grad diff vs eager |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        label = {"floor": "the three GEMMs (floor)", "eager": f"ours, eager, chunk {args.chunk_size}",
                 "compiled": f"ours, compiled, chunk {args.chunk_size}", "naive": "naive (full T x V logits)"}.get(
            name, f"Liger LigerFusedLinearJSDLoss, chunk {name.partition(':')[2]}")
        steady = min(r["times"][1:] or r["times"])
        ratio = f"{steady / floor_time:.2f}" if floor_time else "-"
        compare = "-" if name == "floor" or reference is None else \
            f"{(r['grad'] - reference['grad']).abs().max().item():.1e}"
        loss = "-" if name == "floor" else f"{r['loss']:.6f}"
        lines.append(f"| {label} | {steady:.2f} | {ratio} | {r['times'][0]:.2f} | {r['peak_gb']:.2f} | "
                     f"{r['peak_gb'] - r['baseline_gb']:.2f} | {loss} | {compare} |")
    return "\n".join(lines), results


def main():
    args = get_parser().parse_args()
    if args.smoke:
        args.T, args.H, args.V, args.repeats, args.chunk_size, args.liger_chunk_size = [64], 32, 1000, 2, 16, [32]
    if args.variant:
        return run_variant(args)
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {platform.node()} | {os.cpu_count()} CPUs, {memory_gb:.1f} GiB "
          f"RAM | torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
    texts = []
    for T in args.T:
        text, results = table(args, T)
        texts.append(text)
        print("\n" + text, flush=True)
        if "eager" in results:  # the same loss from every variant that computes it
            for name, r in results.items():
                if name != "floor":
                    assert abs(r["loss"] - results["eager"]["loss"]) < 1e-4 * abs(results["eager"]["loss"]) + 1e-6, name
    return texts


if __name__ == "__main__":
    main()

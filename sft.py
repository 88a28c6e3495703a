"""
Supervised fine-tuning on reference solutions: the paper's SFT baseline, and how the toy world's
base model is made from scratch.

For each record (x, y*): the student prompt for x (prompts.py, the same one OPSD and eval use), then
y* and the end-of-turn token; next-token cross-entropy on the assistant tokens only (the EOS is
trained, the prompt is not). A record with a `reference` field is a *teacher-format* example: its
prompt is the teacher prompt (x + reference + transition) and y* the solution to write after it;
the toy world's warm start uses these so the model learns to use a reference in context.

Batches are grouped by length and left-padded with position_ids = cumsum(mask) - 1 (opsd.build_batch),
so a batch gives the same loss as its sequences one at a time. The loss is the mean over the batch's
assistant tokens (the usual SFT convention; OPSD averages per sequence first).

Run:
  python sft.py --preset toy                          # continued SFT on the toy references (CPU)
  python sft.py --data train.jsonl --from-scratch --model CONFIG_DIR   # a model from random init
  python sft.py                                       # 1 GPU, paper defaults (Qwen3-1.7B, LoRA)
  torchrun --standalone --nproc_per_node 8 sft.py
"""
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
import opsd
import prompts

# -----------------------------------------------------------------------------
# 1. config


def get_parser():
    parser = opsd.common_parser("SFT on reference solutions (the paper's baseline), or training from scratch.")
    group = parser.add_argument_group("SFT")
    group.add_argument("--from-scratch", action="store_true", help="random init from --model's config (implies --full-finetune)")
    group.add_argument("--max-length", type=int, default=16384, help="prompt + solution tokens; longer solutions are cut (and lose their EOS)")
    # the paper's SFT settings: effective batch 64, 4 epochs, lr 2e-5
    parser.set_defaults(batch_size=64, epochs=4.0, lr=2e-5, out_dir="runs/sft")
    return parser

# -----------------------------------------------------------------------------
# 3. data: (prompt ids, target ids) per record, tokenized once


def tokenize_examples(records, tokenizer, thinking, max_length):
    examples = []
    for record in records:
        if record.get("reference"):  # teacher format: the reference is in the prompt
            prompt = prompts.teacher_prompt_ids(tokenizer, record["problem"], record["reference"], thinking)
        else:
            prompt = prompts.student_prompt_ids(tokenizer, record["problem"], thinking)
        target = prompts.completion_ids(tokenizer, record["solution"])[:max(1, max_length - len(prompt))]
        examples.append((prompt, target))
    return examples

# -----------------------------------------------------------------------------
# 7. loss: next-token cross-entropy, chunked like OPSD's (the T x V logits are never held at once)


def cross_entropy_token_fn(logits, targets):
    return {"loss": F.cross_entropy(opsd.upcast(logits), targets, reduction="none")}


def sft_loss(model, examples, device, pad_id, chunk_size, normalizer, stats=None):
    """Sum over the examples' target tokens of their NLL / normalizer, in one padded batch."""
    batch = opsd.build_batch([p for p, _ in examples], [t for _, t in examples], pad_id, device)
    hidden = opsd.completion_hidden(model, batch)  # (N, H)
    weights = torch.full_like(batch["targets"], 1.0 / normalizer, dtype=torch.float32)
    return opsd.chunked_loss(hidden, opsd.lm_parts(model)[1], cross_entropy_token_fn, weights,
                             (batch["targets"],), chunk_size, stats)


def main(argv=None):
    # 1. config
    args = opsd.parse_config(get_parser(), "sft", argv)
    args.full_finetune = args.full_finetune or args.from_scratch
    # 2-4. distributed init, data, model (random init with --from-scratch)
    run = opsd.setup_run(args, require=("problem", "solution"), from_scratch=args.from_scratch)
    model, tokenizer = run.model, run.tokenizer
    examples = tokenize_examples(run.records, tokenizer, args.thinking, args.max_length)
    start_step, state = common.resume_run(run, args)
    trained_total = state.get("trained_tokens", 0)
    # 5. a sampler only for --eval-every
    sampler = opsd.make_sampler(args, model, tokenizer, run.rank, run.world, run.device) if args.eval_every else None
    per_rank = args.batch_size // run.world
    common.print0(f"{len(examples)} examples | {run.total_steps} steps x {args.batch_size} ({run.world} ranks x {per_rank}, "
                  f"micro-batch {args.micro_batch_size}) | {sum(p.numel() for p in run.params):,} trainable parameters")
    summary = {}
    for step in range(start_step, run.total_steps):
        t0 = time.time()
        # 6. this rank's examples, grouped by length so micro-batches carry little padding
        batch = [examples[i] for i in opsd.batch_indices(len(examples), step, args.batch_size, args.seed, run.rank, run.world)]
        batch.sort(key=lambda e: len(e[0]) + len(e[1]))
        n_tokens = sum(len(t) for _, t in batch)
        # 7. loss and backward, micro-batch by micro-batch: mean over this rank's target tokens
        loss_sum = 0.0
        for start in range(0, per_rank, args.micro_batch_size):
            loss = sft_loss(model, batch[start:start + args.micro_batch_size], run.device, tokenizer.pad_token_id,
                            args.chunk_size, n_tokens)
            loss.backward()
            loss_sum += loss.item()
        # 8. update
        loss, grad_norm, lr = common.optimizer_step(run, args, step, loss_sum)
        # 9. log, eval, checkpoint
        trained = int(common.gather_metrics(run, {"tokens": n_tokens})["tokens"] * run.world)
        trained_total += trained
        elapsed = time.time() - t0
        summary = {"step": step + 1, "loss": loss, "trained_tokens": trained, "trained_tokens_total": trained_total,
                   "generated_tokens_total": 0, "tokens_per_s": trained / elapsed, "lr": lr,
                   "grad_norm": grad_norm, "time_step": elapsed}
        run.logger.log(summary, f"step {step + 1}/{run.total_steps} | loss {loss:.4f} | {trained} tokens | "
                                f"{summary['tokens_per_s']:.0f} tok/s | step {elapsed:.2f}s | lr {summary['lr']:.2e}")
        if common.end_step(run, args, step, sampler, {"trained_tokens": trained_total}):
            break
    if run.world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()

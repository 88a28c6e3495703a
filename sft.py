"""
Supervised fine-tuning on reference solutions: the paper's SFT baseline, and how the toy world's base model is made
from scratch.

For each record (x, y*): the student prompt for x (prompts.py, the one OPSD and eval use), then y* and the end-of-turn
token; next-token cross-entropy on the assistant tokens only (the EOS is trained, the prompt is not). A record with a
`reference` field is a *teacher-format* example: its prompt is the teacher prompt (x + the reference + the
transition) and y* the solution to write after it; the toy world's warm start uses these so the model learns to use
a reference in its context.

Batches are grouped by length and left-padded with position_ids = cumsum(mask) - 1 (opsd.build_batch), so a batch
gives the same loss as its sequences one at a time. The loss is the mean over the step's assistant tokens (the usual
SFT convention; OPSD averages per sequence first).

Run:
  python toy.py sft                                                    # continued SFT on the toy references (CPU)
  python sft.py --data train.jsonl --from-scratch --model CONFIG_DIR   # a model from random init
  python sft.py                                                        # 1 GPU (Qwen3-1.7B, LoRA)
  torchrun --standalone --nproc_per_node 8 sft.py
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import models
import opsd
import plumbing
import prompts
import samplers

# -----------------------------------------------------------------------------
# 1. config: the shared option groups (plumbing), then SFT's own


def get_parser():
    parser = plumbing.training_parser("SFT on reference solutions (the paper's baseline), or training from scratch.",
                                      "sft")
    group = parser.add_argument_group("SFT")
    group.add_argument("--from-scratch", action="store_true", help="random init from --model's config (full fine-tune)")
    group.add_argument("--max-length", type=plumbing.positive_int, default=None,
                       help="prompt + solution tokens, longer solutions cut (default: the model's context)")
    group.add_argument("--stop-at-eval-avg", type=plumbing.fraction, default=None,
                       help="save and stop at the first periodic eval whose avg reaches this")
    parser.set_defaults(batch_size=64, epochs=4.0, lr=2e-5)  # the paper's SFT settings
    return parser

# -----------------------------------------------------------------------------
# 3. examples: (prompt ids, target ids) per record, tokenized once


def tokenize_examples(records, tokenizer, thinking, max_length):
    """(prompt ids, target ids) per record: the student prompt, or the teacher prompt for a teacher-format example
    (a "reference" in the prompt); the solution cut to what max_length leaves (the checks left at least 1 token)."""
    examples = []
    for record in records:
        prompt = prompts.record_prompt_ids(tokenizer, record, thinking)
        target = prompts.completion_ids(tokenizer, record["solution"])[:max_length - len(prompt)]
        examples.append((prompt, target))
    return examples

# -----------------------------------------------------------------------------
# 7. the loss: next-token cross-entropy, chunk by chunk of positions (each chunk's logits recomputed in backward)


def token_nll(hidden, head, targets):
    return F.cross_entropy(opsd.upcast(hidden @ head.T), targets, reduction="none")  # (C,)


def sft_loss(model, examples, device, pad_id, chunk_size, normalizer, nll_fn=token_nll):
    """Sum over the examples' target tokens of their NLL / normalizer, in one padded batch; `nll_fn`: token_nll or its
    compiled form."""
    batch = opsd.build_batch([p for p, _ in examples], [t for _, t in examples], pad_id, device)
    hidden = opsd.completion_hidden(model, batch)  # (N, H)
    head = models.lm_parts(model)[1]
    targets = batch["targets"]
    nll = torch.cat([checkpoint(nll_fn, hidden[i:i + chunk_size], head, targets[i:i + chunk_size], use_reentrant=False)
                     for i in range(0, len(targets), chunk_size)])  # (N,)
    return nll.sum() / normalizer

# -----------------------------------------------------------------------------
# 9. the run


def main(argv=None):
    # 1. config (--from-scratch trains every weight: applied before the checks, so they see it)
    args = plumbing.parse_config(get_parser(), argv, implied={"from_scratch": {"full_finetune": True}})
    if args.stop_at_eval_avg is not None and not args.eval_every:
        raise prompts.UserError("--stop-at-eval-avg needs --eval-every (and --eval-data): it stops at a periodic eval")
    # 2. torchrun
    rank, world, device = opsd.init_distributed()
    dtype = plumbing.compute_dtype(args.dtype, device)
    # 3. data: problems with a reference solution, tokenized once
    records = prompts.load_records(args.data, args.split, require=("problem", "solution"), limit=args.max_problems)
    tokenizer = plumbing.load_tokenizer(args.model)
    context = getattr(plumbing.model_config(args.model), "max_position_embeddings", None)
    if args.max_length is not None and context is not None and args.max_length > context:
        raise prompts.UserError(f"--max-length {args.max_length}: the model's context is {context:,} positions")
    max_length = args.max_length or context or 16384  # a model that states no context: 16,384
    too_long = prompts.prompts_too_long(tokenizer, records, max_length - 1, args.thinking)  # >= 1 solution token
    records = plumbing.fit_to_context(records, too_long, args, "prompt", max_length - 1, "raise --max-length")
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(records) / args.batch_size))
    run = plumbing.Run(args, "sft", rank, world, device, total_steps)
    # 4. model (random init with --from-scratch), the optimizer, and on --resume the checkpoint's state
    torch.manual_seed(args.seed)
    model, tokenizer = models.load_model(args.model, device, dtype, models.lora_config(args), args.from_scratch,
                                       args.grad_checkpointing)
    examples = tokenize_examples(records, tokenizer, args.thinking, max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = opsd.make_optimizer(args, params, total_steps)
    state = run.restore(model, optimizer, scheduler)
    trained_total = state.get("trained_tokens", 0)
    # 5. a sampler only for --eval-every, and the token NLL (compiled)
    sampler = None
    if args.eval_every:
        lora_rank = None if args.full_finetune else args.lora_r
        eval_texts = [prompts.record_prompt_text(tokenizer, r, args.thinking) for r in run.eval_records]
        eval_budget = args.eval_max_new_tokens or args.max_new_tokens
        max_model_len = prompts.most_tokens(tokenizer, eval_texts)[1] + eval_budget  # vLLM's engine size
        sampler = samplers.make_sampler(args.sampler, model, tokenizer, args.model, device, dtype, lora_rank,
                                        args.seed, args.vllm_gpu_memory, world, args.vllm_sleep, max_model_len)
    nll_fn = torch.compile(token_nll) if args.compile else token_nll
    per_rank = args.batch_size // world
    run.print(f"{len(examples)} examples | {total_steps} steps x {args.batch_size} ({world} ranks x {per_rank}, "
              f"micro-batch {args.micro_batch_size}) | {sum(p.numel() for p in params):,} trainable parameters")
    record = {}
    for step in range(run.start_step, total_steps):
        clock = plumbing.StageClock(device)
        # 6. this rank's examples, grouped by length so micro-batches carry little padding
        indices = opsd.batch_indices(len(examples), step, args.batch_size, args.seed, rank, world)
        batch = sorted((examples[i] for i in indices), key=lambda e: len(e[0]) + len(e[1]))
        n_tokens = sum(len(target) for _, target in batch)
        # 7. loss and backward, micro-batch by micro-batch: the mean over this rank's target tokens
        loss = 0.0
        model.train()  # LoRA dropout and gradient checkpointing act in train mode only
        for start in range(0, per_rank, args.micro_batch_size):
            with plumbing.autocast(device, dtype):
                part_loss = sft_loss(model, batch[start:start + args.micro_batch_size], device, tokenizer.pad_token_id,
                                     args.chunk_size, n_tokens, nll_fn)
            part_loss.backward()
            loss += part_loss.detach()
        model.eval()
        # 8. update
        loss = plumbing.over_ranks(world, device, means={"loss": loss})["loss"]
        grad_norm, lr = opsd.update(params, optimizer, scheduler, args.max_grad_norm, world, step, loss)
        # 9. log, eval, checkpoint
        trained = int(plumbing.over_ranks(world, device, sums={"tokens": n_tokens})["tokens"])
        trained_total += trained
        seconds = clock.total()
        record = {"step": step + 1, "loss": loss, "trained_tokens": trained, "trained_tokens_total": trained_total,
                  "generated_tokens_total": 0, "tokens_per_s": trained / seconds, "lr": lr, "grad_norm": grad_norm,
                  "time_step": seconds}
        run.log(record, f"step {step + 1}/{total_steps} | loss {loss:.4f} | {trained} tokens | "
                        f"{record['tokens_per_s']:.0f} tok/s | {seconds:.2f}s | lr {lr:.2e}")
        reached = False
        if run.eval_due(step, total_steps):
            lora_request = opsd.adapter_for(sampler, model, args.out_dir, rank, f"eval{step + 1}")
            summary = run.evaluate(step + 1, sampler, tokenizer, thinking=args.thinking, lora_request=lora_request)
            reached = args.stop_at_eval_avg is not None and summary["avg"] >= args.stop_at_eval_avg
        if run.end_step(step, model, tokenizer, optimizer, scheduler, {"trained_tokens": trained_total}, stop=reached):
            break
    run.finish(sampler)
    return record


if __name__ == "__main__":
    plumbing.run_script(main)

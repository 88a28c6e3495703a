"""
GRPO (Group Relative Policy Optimization, DeepSeekMath arXiv 2402.03300): the paper's RL baseline, with opsd.py's
building blocks (model, samplers, sequences, update), so that `diff grpo.py opsd.py` shows the algorithm.

For each problem x with a gold answer a:
  1. the policy samples G rollouts y_1..y_G;
  2. reward r_i = 1 if the last \\boxed{} of y_i equals a (prompts.grade, the grader eval.py uses), else 0;
  3. advantage A_i = (r_i - mean(r)) / (std(r) + eps) within the group, the same for every token of y_i; a group
     that is all right or all wrong has A = 0 and gives no signal;
  4. per token, ratio = p(y_n) / p_old(y_n) and loss -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)
     (+ kl_beta * k3-KL to the reference, the adapter switched off), averaged over each rollout's tokens, then over
     rollouts (DeepSeekMath Eq. 3, as opsd.py averages its loss).
With one update per batch (--ppo-epochs 1, the default) the ratio is exactly 1 and the loss is exactly 0 (the
group-normalised advantages have mean 0); its gradient is not: follow the reward and the gradient norm.

Where this departs from the paper and the official code (and why):
  - the same prompts, sampler, sequences and schedule as opsd.py: a comparison measures the algorithm;
  - log-probs are taken at the sampling temperature (logits / T), as opsd.py does;
  - no KL term by default (--kl-beta 0, as in DAPO); the reference, when used, is the adapter switched off;
  - `--batch-size` counts problems; each gets G rollouts; with --ppo-epochs E the schedule counts E updates a step.

Run:
  python toy.py grpo                                 # the CPU toy world (toy.py), minutes
  python grpo.py                                     # 1 GPU (Qwen3-1.7B, vLLM)
  torchrun --standalone --nproc_per_node 8 grpo.py   # 8 GPUs
"""
import math

import torch
from torch.utils.checkpoint import checkpoint

import models
import opsd
import plumbing
import prompts
import samplers

# -----------------------------------------------------------------------------
# 1. config: the shared option groups (plumbing), then GRPO's own


def get_parser():
    parser = plumbing.training_parser("GRPO: G rollouts per problem, 0/1 reward from the answer checker, "
                                      "group-normalised advantage, PPO-clipped update.", "grpo")
    group = parser.add_argument_group("GRPO")
    group.add_argument("--group-size", type=plumbing.bounded(int, 2), default=8, help="G: rollouts per problem")
    group.add_argument("--ppo-clip-eps", type=plumbing.positive_float, default=0.2, help="PPO clip: [1 - eps, 1 + eps]")
    group.add_argument("--kl-beta", type=plumbing.nonnegative, default=0.0, help="k3 KL weight to the adapter off")
    group.add_argument("--ppo-epochs", type=plumbing.positive_int, default=1, help="updates per batch (1: ratio = 1)")
    group.add_argument("--adv-eps", type=plumbing.positive_float, default=1e-4, help="eps in (r - mean) / (std + eps)")
    parser.set_defaults(max_new_tokens=16384, temperature=1.2)  # the paper's GRPO baseline
    return parser

# -----------------------------------------------------------------------------
# 6. advantages: the group is the baseline (no value network)


def group_advantages(rewards, eps=1e-4):
    """(r - mean) / (std + eps) within each group of G rollouts of one problem. rewards (P, G) -> (P, G). std is the
    *sample* std (Bessel's correction), as TRL's GRPOTrainer computes it; an all-equal group gives exactly 0."""
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return (centred / (rewards.std(dim=1, keepdim=True) + eps)).float()

# -----------------------------------------------------------------------------
# 7. the loss: the rollout tokens' log-probs, chunk by chunk, then the clipped surrogate on them


def token_logprobs(hidden, head, targets, temperature):
    """log p(target) under softmax(hidden @ head.T / T), the distribution that sampled the rollout. (C,)"""
    logp = (opsd.upcast(hidden @ head.T) / temperature).log_softmax(-1)  # (C, V)
    return logp.gather(-1, targets[:, None])[:, 0]


def rollout_logprobs(hidden, head, targets, temperature, chunk_size, logprobs=token_logprobs):
    """`logprobs` (token_logprobs, or its compiled form) for all N rows, chunk_size rows at a time; each chunk's (C, V)
    logits are recomputed in the backward pass (checkpoint) instead of kept, so one chunk's exist at a time. (N,)"""
    chunks = []
    for start in range(0, len(targets), chunk_size):
        rows = slice(start, start + chunk_size)
        chunks.append(checkpoint(logprobs, hidden[rows], head, targets[rows], temperature, use_reentrant=False))
    return torch.cat(chunks)


def clipped_surrogate(logp, old_logp, advantages, clip_eps):
    """PPO's per-token loss -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A), ratio = exp(logp - old_logp). Its gradient
    in logp is -ratio A where the unclipped term is the minimum, else 0. Returns (loss, clipped?) per token."""
    ratio = (logp - old_logp).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def grpo_token_loss(logp, advantages, old_logp=None, ref_logp=None, clip_eps=0.2, kl_beta=0.0):
    """Per-token GRPO loss from the rollout tokens' log-probs (N,). One update per batch: the policy being scored is
    the one that sampled, so old_logp is logp itself, detached; the ratio is exactly 1 and the gradient is
    A grad logp (REINFORCE with the group baseline). With E > 1 epochs old_logp is fixed before the first."""
    if old_logp is None:
        old_logp = logp.detach()
    loss, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps)
    out = {"clipped": clipped}
    if kl_beta > 0:
        log_ratio = ref_logp - logp  # log p_ref / p
        out["kl"] = log_ratio.exp() - log_ratio - 1  # k3: unbiased, always >= 0 (DeepSeekMath Eq. 4)
        loss = loss + kl_beta * out["kl"]
    return {**out, "loss": loss}

# -----------------------------------------------------------------------------
# 9. the run


def main(argv=None):
    # 1. config
    args = plumbing.parse_config(get_parser(), argv)
    if args.kl_beta > 0 and args.full_finetune:
        raise prompts.UserError("--kl-beta > 0 needs LoRA: the reference is the model with the adapter switched off")
    plumbing.refuse_inert(args, [("ppo_clip_eps", args.ppo_epochs == 1, "with --ppo-epochs 1 (the ratio is 1)")])
    # 2. torchrun
    rank, world, device = opsd.init_distributed()
    dtype = plumbing.compute_dtype(args.dtype, device)
    # 3. data: problems with a gold answer
    records = prompts.load_records(args.data, args.split, require=("problem", "answer"), limit=args.max_problems)
    tokenizer = plumbing.load_tokenizer(args.model)
    room = plumbing.room_for_prompts(args, args.max_new_tokens, "--max-new-tokens")
    if room is not None:  # every prompt + its rollouts must fit the model's context: checked now
        too_long = prompts.prompts_too_long(tokenizer, records, room, args.thinking)
        records = plumbing.fit_to_context(records, too_long, args, "prompt", room, "lower --max-new-tokens")
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(records) / args.batch_size))
    run = plumbing.Run(args, "grpo", rank, world, device, total_steps)
    # 4. model + LoRA, the optimizer (ppo_epochs updates a step), and on --resume the checkpoint's state
    torch.manual_seed(args.seed)
    model, tokenizer = models.load_model(args.model, device, dtype, models.lora_config(args),
                                       grad_checkpointing=args.grad_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = opsd.make_optimizer(args, params, total_steps * args.ppo_epochs)
    state = run.restore(model, optimizer, scheduler)
    generated_total = state.get("generated_tokens", 0)
    # 5. the sampler, and the rollout tokens' log-probs (compiled)
    lora_rank = None if args.full_finetune else args.lora_r
    max_model_len = plumbing.longest_request(tokenizer, records, args, run.eval_records)
    sampler = samplers.make_sampler(args.sampler, model, tokenizer, args.model, device, dtype, lora_rank, args.seed,
                                    args.vllm_gpu_memory, world, args.vllm_sleep, max_model_len)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.sampling_top_k)
    temperature = args.temperature or 1.0  # greedy rollouts are scored at 1
    logprobs_fn = torch.compile(token_logprobs) if args.compile else token_logprobs
    head = models.lm_parts(model)[1]
    per_rank = args.batch_size // world
    n_rollouts = per_rank * args.group_size  # sequences per rank per step
    run.print(f"{len(records)} problems | {total_steps} steps x {args.batch_size} problems x {args.group_size} "
              f"rollouts ({world} ranks x {n_rollouts} sequences) | {sum(p.numel() for p in params):,} trainable "
              f"parameters | clip {args.ppo_clip_eps} kl {args.kl_beta} epochs {args.ppo_epochs} | "
              f"{type(sampler).__name__}")
    record = {}
    for step in range(run.start_step, total_steps):
        clock = plumbing.StageClock(device)
        # 6. this rank's problems as prompt ids; G rollouts each from the current policy; 0/1 rewards; advantages
        indices = opsd.batch_indices(len(records), step, args.batch_size, args.seed, rank, world)
        batch = [records[i] for i in indices]
        student_prompts = [prompts.student_prompt_ids(tokenizer, r["problem"], args.thinking) for r in batch]
        seeds = [plumbing.request_seed(args.seed, step, i) for i in indices]
        lora_request = opsd.adapter_for(sampler, model, args.out_dir, rank, f"step{step}")
        samples = sampler.generate(student_prompts, args.group_size, sampling, seeds, lora_request)
        # problem-major: rollout i G + j is (problem i, sample j)
        rollouts = [s.ids for group in samples for s in group]
        rollout_prompts = [p for p in student_prompts for _ in range(args.group_size)]
        clock.lap("sample")
        rewards = torch.zeros(len(batch), args.group_size)  # (P, G)
        for i, (group, record) in enumerate(zip(samples, batch)):
            for j, sample in enumerate(group):
                text = tokenizer.decode(sample.ids, skip_special_tokens=True)
                rewards[i, j] = float(prompts.grade(text, record["answer"]))
        advantages = group_advantages(rewards, args.adv_eps).flatten().to(device)  # (P G,)
        # 7. micro-batches; per token the rollout's advantage and weight 1/(|y_i| P G): the mean over a rollout's
        # tokens, then over rollouts. old_logp (E > 1) and ref_logp (kl_beta > 0) are fixed before any update, in
        # eval mode (no dropout: the policy that sampled)
        micro_batches = []
        for start in range(0, n_rollouts, args.micro_batch_size):
            part = slice(start, start + args.micro_batch_size)
            b = opsd.build_batch(rollout_prompts[part], rollouts[part], tokenizer.pad_token_id, device)
            b["advantages"] = advantages[part].repeat_interleave(b["lengths"])  # (N,)
            b["weights"] = opsd.per_token_weights(b["lengths"], n_rollouts, device)  # (N,)
            with torch.no_grad():
                with plumbing.autocast(device, dtype):
                    if args.ppo_epochs > 1:
                        hidden = opsd.completion_hidden(model, b)
                        b["old_logp"] = rollout_logprobs(hidden, head, b["targets"], temperature, args.chunk_size,
                                                         logprobs_fn)
                    if args.kl_beta > 0:
                        with model.disable_adapter():
                            hidden = opsd.completion_hidden(model, b)
                            b["ref_logp"] = rollout_logprobs(hidden, head, b["targets"], temperature, args.chunk_size,
                                                             logprobs_fn)
            micro_batches.append(b)
        # 8. update: ppo_epochs optimizer steps on the same rollouts (the clip binds from the second on)
        clipped, kl, losses, grad_norms = 0.0, 0.0, [], []
        for _ in range(args.ppo_epochs):
            loss = 0.0
            model.train()  # the policy pass: LoRA dropout and gradient checkpointing act here
            for b in micro_batches:
                with plumbing.autocast(device, dtype):
                    hidden = opsd.completion_hidden(model, b)
                    logp = rollout_logprobs(hidden, head, b["targets"], temperature, args.chunk_size,
                                            logprobs_fn)  # (N,), with grad
                    out = grpo_token_loss(logp, b["advantages"], b.get("old_logp"), b.get("ref_logp"),
                                          args.ppo_clip_eps, args.kl_beta)
                    part_loss = (out["loss"] * b["weights"]).sum()
                part_loss.backward()
                loss += part_loss.detach()
                clipped += (out["clipped"] * b["weights"]).sum().detach() / args.ppo_epochs
                if "kl" in out:
                    kl += (out["kl"] * b["weights"]).sum().detach() / args.ppo_epochs
            model.eval()
            loss = plumbing.over_ranks(world, device, means={"loss": loss})["loss"]
            grad_norm, lr = opsd.update(params, optimizer, scheduler, args.max_grad_norm, world, step, loss)
            losses.append(loss)
            grad_norms.append(grad_norm)
        clock.lap("update")
        # 9. log, eval, checkpoint
        generated = sum(len(r) for r in rollouts)
        all_same = (rewards == rewards[:, :1]).all(dim=1).float().mean()  # groups with no signal
        means = {"rollout_acc": rewards.mean(), "zero_adv_groups": all_same, "clip_frac": clipped, "kl": kl}
        metrics = plumbing.over_ranks(world, device, sums={"generated": generated}, means=means)
        generated_total += int(metrics["generated"])
        seconds = clock.total()
        loss = sum(losses) / len(losses)
        grad_norm = sum(grad_norms) / len(grad_norms)
        # rollout_acc is the mean reward; generated_tokens(_total) are opsd.py's keys, for the token-budget comparison
        record = {"step": step + 1, "loss": loss, "rollout_acc": metrics["rollout_acc"],
                  "zero_adv_groups": metrics["zero_adv_groups"], "clip_frac": metrics["clip_frac"], "kl": metrics["kl"],
                  "rollout_len": metrics["generated"] / (args.batch_size * args.group_size),
                  "generated_tokens": int(metrics["generated"]), "generated_tokens_total": generated_total,
                  "tokens_per_s": metrics["generated"] / seconds, "lr": lr, "grad_norm": grad_norm,
                  "time_step": seconds, **{f"time_{stage}": value for stage, value in clock.seconds.items()}}
        surrogate = f"loss {loss:.4f} | " if args.ppo_epochs > 1 else ""  # with one epoch it is 0 by construction
        run.log(record, f"step {step + 1}/{total_steps} | {surrogate}reward {record['rollout_acc']:.2f} | "
                        f"zero-adv groups {record['zero_adv_groups']:.2f} | grad norm {grad_norm:.3f} | "
                        f"len {record['rollout_len']:.0f} | {record['tokens_per_s']:.0f} tok/s | {seconds:.1f}s")
        if run.eval_due(step, total_steps):
            run.evaluate(step + 1, sampler, tokenizer, thinking=args.thinking,
                         lora_request=opsd.adapter_for(sampler, model, args.out_dir, rank, f"eval{step + 1}"))
        if run.end_step(step, model, tokenizer, optimizer, scheduler, {"generated_tokens": generated_total}):
            break
    run.finish(sampler)
    return record


if __name__ == "__main__":
    plumbing.run_script(main)

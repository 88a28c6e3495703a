"""
GRPO (Group Relative Policy Optimization, DeepSeekMath arXiv 2402.03300): the paper's RL baseline, on the
same library as opsd.py, so that the two differ only in the algorithm (`diff grpo.py opsd.py`).

For each problem x with a gold answer a:
  1. the policy samples G rollouts y_1..y_G;
  2. reward r_i = 1 if the last \\boxed{} of y_i equals a (prompts.grade, the grader eval.py uses), else 0;
  3. advantage A_i = (r_i - mean(r)) / (std(r) + eps) within the group, the same for every token of y_i;
     a group that is all right or all wrong has A = 0 and gives no signal;
  4. per token, ratio = p(y_n) / p_old(y_n) and loss -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A),
     (+ kl_beta * k3-KL to the reference = the adapter switched off), averaged over each rollout's tokens,
     then over rollouts (as DeepSeekMath Eq. 3, and as opsd.py averages its loss).
With one update per batch (--ppo-epochs 1, the default) the ratio is exactly 1 and the logged loss is exactly
0: the group-normalised advantages have mean 0 and each rollout's tokens weigh 1/G in all. Its gradient is
not 0; follow the reward and the gradient norm instead.

Where this departs from the paper and the official code (and why):
  - the same prompts, sampler, sequence packing and chunked loss as opsd.py, and the same schedule and
    checkpoints: a comparison of the two measures the algorithm, not the plumbing;
  - log-probs are taken at the sampling temperature (logits / T), as opsd.py does, so the policy in the
    loss is the one that sampled;
  - no KL term by default (--kl-beta 0, as in DAPO; it also saves the reference pass); the reference, when
    used, is the adapter switched off, so --kl-beta needs LoRA;
  - `--batch-size` counts problems; each gets G rollouts, so a step trains on batch x G sequences;
  - with --ppo-epochs E > 1 the learning-rate schedule counts the E updates per batch.

Run:
  python grpo.py --preset toy                        # the CPU toy world (toy.py), minutes
  python grpo.py                                     # 1 GPU (Qwen3-1.7B, vLLM)
  torchrun --standalone --nproc_per_node 8 grpo.py   # 8 GPUs
"""
import time

import torch

import common
import lm
import prompts

# -----------------------------------------------------------------------------
# GRPO's options (the shared ones are in common.training_parser)


def get_parser():
    parser = common.training_parser("GRPO: G rollouts per problem, 0/1 reward from the answer checker, group-normalised "
                                    "advantage, PPO-clipped update.", "grpo")
    group = parser.add_argument_group("GRPO")
    group.add_argument("--group-size", type=common.bounded(int, 2), default=8, help="G: rollouts per problem (--batch-size counts problems); one rollout has no group baseline")
    group.add_argument("--ppo-clip-eps", type=common.positive_float, default=0.2, help="PPO clip range: the ratio is kept in [1 - eps, 1 + eps]")
    group.add_argument("--kl-beta", type=common.nonnegative, default=0.0, help="weight of the k3 KL to the reference (the adapter off); 0 skips the reference pass")
    group.add_argument("--ppo-epochs", type=common.positive_int, default=1, help="updates per batch of rollouts (1: on-policy, ratio = 1)")
    group.add_argument("--adv-eps", type=common.positive_float, default=1e-4, help="eps in (r - mean) / (std + eps)")
    # the paper's GRPO baseline: 16k-token rollouts at temperature 1.2
    parser.set_defaults(max_new_tokens=16384, temperature=1.2)
    return parser

# -----------------------------------------------------------------------------
# advantages: the group is the baseline (no value network)


def group_advantages(rewards, eps=1e-4):
    """(r - mean) / (std + eps) within each group of G rollouts of one problem. rewards (P, G) -> (P, G).
    std is the *sample* std (Bessel's correction, torch's default), as TRL's GRPOTrainer computes it;
    DeepSeekMath writes "std" without saying which. An all-equal group gives exactly 0 (0 / eps)."""
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    return (centred / (rewards.std(dim=1, keepdim=True) + eps)).float()

# -----------------------------------------------------------------------------
# the per-token loss: the clipped surrogate, fed to lm.chunked_loss so T x V logits never exist at once


def token_logprobs(logits, targets, temperature):
    """log p(target) under softmax(logits / T), the distribution that sampled the rollout. (C,)"""
    logits = lm.upcast(logits)
    return (logits / (temperature if temperature > 0 else 1.0)).log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def clipped_surrogate(logp, old_logp, advantages, clip_eps):
    """PPO's per-token loss -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A), ratio = exp(logp - old_logp).
    Its gradient in logp is -ratio A where the unclipped term is the minimum, else 0 (the update has already
    moved this token's probability far enough in the advantage's direction)."""
    ratio = (logp - old_logp).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def grpo_token_fn(*, temperature=1.0, clip_eps=0.2, kl_beta=0.0, ppo_epochs=1):
    """Per-token GRPO loss for lm.chunked_loss. Extras per token: targets, advantages, then old_logp if
    ppo_epochs > 1, then ref_logp if kl_beta > 0 (both computed once, without grad, before the update)."""
    def token_fn(logits, targets, advantages, *given):
        given = iter(given)
        logp = token_logprobs(logits, targets, temperature)  # (C,)
        # one update per batch: the policy being scored is the one that sampled, so old_logp is logp itself,
        # detached; the ratio is exactly 1, the clip never binds, and the gradient is A * grad logp
        # (REINFORCE with the group baseline). With E > 1 epochs old_logp is fixed.
        old_logp = next(given) if ppo_epochs > 1 else logp.detach()
        loss, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps)
        out = {"clipped": clipped}
        if kl_beta > 0:
            log_ratio = next(given) - logp  # log p_ref / p
            kl = log_ratio.exp() - log_ratio - 1  # k3: unbiased, always >= 0 (DeepSeekMath Eq. 4)
            loss = loss + kl_beta * kl
            out["kl"] = kl
        out["loss"] = loss
        return out
    return token_fn


@torch.no_grad()
def rollout_logprobs(model, batch, temperature, chunk_size):
    """log p(rollout token) for every completion token of a batch, chunk by chunk of positions. (N,)"""
    _, weight = lm.lm_parts(model)
    hidden = lm.completion_hidden(model, batch)  # (N, H)
    return torch.cat([token_logprobs(hidden[start:start + chunk_size] @ weight.T, batch["targets"][start:start + chunk_size], temperature)
                      for start in range(0, hidden.shape[0], chunk_size)])

# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    # 1. config
    args = common.parse_config(get_parser(), argv)
    if args.kl_beta > 0 and args.full_finetune:
        raise prompts.UserError("--kl-beta > 0 needs LoRA: the reference is the model with the adapter switched off")
    # 2-4. distributed init, data (problems with a gold answer), model + LoRA, optimizer (ppo_epochs updates a step)
    run = common.setup_run(args, "grpo", require=("problem", "answer"), updates_per_step=args.ppo_epochs)
    model, tokenizer, records = run.model, run.tokenizer, run.records
    generated_total = run.state.get("generated_tokens", 0)
    # 5. sampler
    sampler = common.make_run_sampler(run, args)
    per_rank = args.batch_size // run.world
    n_rollouts = per_rank * args.group_size  # sequences per rank per step
    common.print0(f"{len(records)} problems | {run.total_steps} steps x {args.batch_size} problems x {args.group_size} rollouts "
                  f"({run.world} ranks x {n_rollouts} sequences, micro-batch {args.micro_batch_size}) | "
                  f"{sum(p.numel() for p in run.params):,} trainable parameters | clip {args.ppo_clip_eps} kl {args.kl_beta} "
                  f"epochs {args.ppo_epochs} | sampler {type(sampler).__name__}")
    policy_weight = lm.lm_parts(model)[1]
    token_fn = grpo_token_fn(temperature=args.temperature, clip_eps=args.ppo_clip_eps, kl_beta=args.kl_beta, ppo_epochs=args.ppo_epochs)
    summary = {}
    for step in range(run.start_step, run.total_steps):
        t0 = time.time()
        # 6. this rank's problems as prompt ids (never re-encoded); G rollouts each; 0/1 rewards; advantages
        batch = [records[i] for i in common.batch_indices(len(records), step, args.batch_size, args.seed, run.rank, run.world)]
        student_prompts = [prompts.student_prompt_ids(tokenizer, r["problem"], args.thinking) for r in batch]
        sampler.update(model, step)
        groups = sampler.generate(student_prompts, args.group_size, args.max_new_tokens, args.temperature,
                                  args.top_p, args.sampling_top_k, seed=args.seed + step)
        rollouts = [r for group in groups for r in group]  # problem-major: rollout i * G + j is (problem i, sample j)
        rollout_prompts = [p for p in student_prompts for _ in range(args.group_size)]
        t_sample = time.time() - t0
        rewards = torch.tensor([[float(prompts.grade(tokenizer.decode(r, skip_special_tokens=True), record["answer"]))
                                 for r in group] for group, record in zip(groups, batch)])  # (P, G)
        advantages = group_advantages(rewards, args.adv_eps).flatten().to(run.device)  # (P * G,)
        # 7. score the rollouts micro-batch by micro-batch; each rollout's tokens share its advantage. The loss
        # is the mean over a rollout's tokens, then over rollouts (lm.sequence_mean_weights, as opsd.py)
        parts = [slice(start, start + args.micro_batch_size) for start in range(0, n_rollouts, args.micro_batch_size)]
        micro_batches = [lm.build_batch(rollout_prompts[part], rollouts[part], tokenizer.pad_token_id, run.device) for part in parts]
        extras = [[b["targets"], advantages[part].repeat_interleave(b["lengths"])] for part, b in zip(parts, micro_batches)]
        for b, extra in zip(micro_batches, extras):  # fixed per-token log-probs, once, before any update
            if args.ppo_epochs > 1:
                extra.append(rollout_logprobs(model, b, args.temperature, args.chunk_size))  # old_logp
            if args.kl_beta > 0:
                with model.disable_adapter():
                    extra.append(rollout_logprobs(model, b, args.temperature, args.chunk_size))  # ref_logp
        # 8. update: ppo_epochs optimizer steps on the same rollouts (the clip binds from the second on)
        stats, losses, grad_norms = {}, [], []
        for _ in range(args.ppo_epochs):
            loss_sum = 0.0
            for b, extra in zip(micro_batches, extras):
                hidden = lm.completion_hidden(model, b)  # (N, H), with grad
                loss = lm.chunked_loss(hidden, policy_weight, lm.sequence_mean_weights(b["lengths"], n_rollouts), token_fn,
                                       extra, args.chunk_size, stats)
                loss.backward()
                loss_sum += loss.detach()
            loss, grad_norm, lr = common.optimizer_step(run, args, step, loss_sum)
            losses.append(loss)
            grad_norms.append(grad_norm)
        # 9. log, eval, checkpoint
        generated = sum(len(r) for r in rollouts)
        metrics = common.gather(run, sums={"generated": generated},
                                means={"rollout_len": generated / n_rollouts, "rollout_acc": rewards.mean(),
                                       "zero_adv_groups": (rewards == rewards[:, :1]).all(dim=1).float().mean(),
                                       "clip_frac": stats["clipped"] / args.ppo_epochs, "kl": stats.get("kl", 0.0) / args.ppo_epochs})
        generated_total += int(metrics["generated"])
        elapsed = time.time() - t0
        loss, grad_norm = sum(losses) / len(losses), sum(grad_norms) / len(grad_norms)
        # rollout_acc is the mean reward; generated_tokens(_total) are the keys opsd.py logs, for the token-budget comparison
        summary = {"step": step + 1, "loss": loss, **{k: metrics[k] for k in ("rollout_acc", "zero_adv_groups", "clip_frac", "kl", "rollout_len")},
                   "generated_tokens": int(metrics["generated"]), "generated_tokens_total": generated_total,
                   "tokens_per_s": metrics["generated"] / elapsed, "lr": lr, "grad_norm": grad_norm, "time_sample": t_sample,
                   "time_step": elapsed}
        surrogate = f"loss {loss:.4f} | " if args.ppo_epochs > 1 else ""  # with one epoch it is 0 by construction
        run.logger.log(summary, f"step {step + 1}/{run.total_steps} | {surrogate}reward {metrics['rollout_acc']:.2f} | "
                                f"zero-adv groups {metrics['zero_adv_groups']:.2f} | grad norm {grad_norm:.3f} | "
                                f"len {metrics['rollout_len']:.0f} | {summary['tokens_per_s']:.0f} tok/s | "
                                f"sample {t_sample:.1f}s step {elapsed:.1f}s | lr {lr:.2e}")
        if common.eval_due(args, step, run.total_steps):
            common.evaluate(run, args, sampler, step + 1)
        if common.end_step(run, args, step, {"generated_tokens": generated_total}):
            break
    common.finish(run, args, sampler)
    return summary


if __name__ == "__main__":
    common.run_script(main)

"""The specification of grpo.py: group advantages, the clipped surrogate, the reward, the update's direction, resume.

  python -m pytest -q test_grpo.py
"""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import grpo
import models
import opsd
import prompts
import samplers
import toy


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random Qwen3 with the toy tokenizer, and 32 toy problems."""
    return toy.build_tiny(tmp_path_factory.mktemp("grpo"))


def run_args(world, out_dir, *extra):
    adapter = [] if "--full-finetune" in extra else ["--lora-r", "8", "--lora-alpha", "16"]
    return ["--model", world["model"], "--data", world["data"], "--batch-size", "2", "--group-size", "4",
            "--micro-batch-size", "3", "--max-new-tokens", "16", *adapter,
            "--lr", "1e-2", "--warmup-ratio", "0", "--no-compile", "--out-dir", str(out_dir), *extra]


def parity_reward(completion, gold, timeout=5.0):
    """A deterministic reward a random model earns about half the time: an even number of characters."""
    return len(completion) % 2 == 0

# -----------------------------------------------------------------------------
# 1. advantages


def test_group_advantages_match_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    advantages = grpo.group_advantages(rewards, eps=1e-4)
    # group 0: mean 1/4, sample std sqrt((3/4)^2 + 3 (1/4)^2) / 3) = 1/2
    expected_0 = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    # group 1: mean 1/2, sample std sqrt(4 (1/2)^2 / 3) = 1/sqrt(3)
    expected_1 = torch.tensor([0.5, 0.5, -0.5, -0.5]) / (1 / math.sqrt(3) + 1e-4)
    torch.testing.assert_close(advantages[0], expected_0)
    torch.testing.assert_close(advantages[1], expected_1)
    assert torch.equal(advantages[2:], torch.zeros(2, 4))  # all right or all wrong: exactly no signal
    assert advantages.shape == rewards.shape

# -----------------------------------------------------------------------------
# 2. the clipped surrogate: gradient -ratio * A where the unclipped term is the minimum, else 0


SURROGATE_CASES = [  # (ratio, advantage, clip binds)
    (0.5, 2.0, False), (1.1, 2.0, False), (1.5, 2.0, True),    # A > 0: only a ratio above 1 + eps is clipped
    (0.5, -2.0, True), (0.9, -2.0, False), (1.5, -2.0, False),  # A < 0: only a ratio below 1 - eps is clipped
]


@pytest.mark.parametrize("ratio,advantage,binds", SURROGATE_CASES)
def test_clipped_surrogate_gradient_in_logp(ratio, advantage, binds):
    logp = torch.tensor([-1.3], dtype=torch.float64, requires_grad=True)
    old_logp = logp.detach() - math.log(ratio)
    loss, clipped = grpo.clipped_surrogate(logp, old_logp, torch.tensor([advantage], dtype=torch.float64), 0.2)
    loss.sum().backward()
    expected_loss = -min(ratio * advantage, min(max(ratio, 0.8), 1.2) * advantage)
    torch.testing.assert_close(loss, torch.tensor([expected_loss], dtype=torch.float64))
    torch.testing.assert_close(logp.grad, torch.tensor([0.0 if binds else -ratio * advantage], dtype=torch.float64))
    assert clipped.item() == float(binds)


@pytest.mark.parametrize("ratio,advantage,binds", SURROGATE_CASES)
def test_the_loss_gradient_in_logits_is_taken_at_the_sampling_temperature(ratio, advantage, binds):
    # through the logits: d logp(y) / d logits = (onehot(y) - softmax(logits / T)) / T
    hidden = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    head, targets = torch.eye(7, dtype=torch.float64), torch.tensor([2, 0, 6])  # logits = hidden
    logp = grpo.rollout_logprobs(hidden, head, targets, 1.5, chunk_size=2)
    old_logp = logp.detach() - math.log(ratio)
    out = grpo.grpo_token_loss(logp, torch.full((3,), advantage, dtype=torch.float64), old_logp)
    out["loss"].sum().backward()
    dloss_dlogp = 0.0 if binds else -ratio * advantage
    expected = dloss_dlogp * (torch.nn.functional.one_hot(targets, 7) - (hidden.detach() / 1.5).softmax(-1)) / 1.5
    torch.testing.assert_close(hidden.grad, expected)
    assert out["clipped"].tolist() == [float(binds)] * 3


def test_one_epoch_is_reinforce_with_ratio_one():
    # --ppo-epochs 1: old_logp is logp.detach(), so the loss is -A and its gradient -A * grad logp
    logits = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3])
    advantages = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    out = grpo.grpo_token_loss(grpo.token_logprobs(logits, torch.eye(5, dtype=torch.float64), targets, 1.0), advantages)
    out["loss"].sum().backward()
    torch.testing.assert_close(out["loss"], -advantages)
    expected = -advantages[:, None] * (torch.nn.functional.one_hot(targets, 5) - logits.detach().softmax(-1))
    torch.testing.assert_close(logits.grad, expected)
    assert out["clipped"].sum() == 0


def test_kl_term_is_k3_to_the_reference():
    logits = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([1, 4])
    logp = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    ref_logp = logp + torch.tensor([0.0, 0.3], dtype=torch.float64)
    out = grpo.grpo_token_loss(logp, torch.zeros(2, dtype=torch.float64), ref_logp=ref_logp, kl_beta=0.1)
    kl = torch.tensor([0.0, math.exp(0.3) - 0.3 - 1], dtype=torch.float64)
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["loss"], 0.1 * kl)


def test_chunked_log_probs_equal_the_full_ones_and_their_gradient():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(11, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    head = torch.randn(30, 8, dtype=torch.float64, generator=generator)
    targets = torch.randint(30, (11,), generator=generator)
    full = (hidden @ head.T / 0.7).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    (grad,) = torch.autograd.grad(full.sum(), hidden)
    chunked = grpo.rollout_logprobs(hidden, head, targets, 0.7, chunk_size=4)  # a ragged last chunk
    torch.testing.assert_close(chunked, full, atol=1e-12, rtol=0)
    chunked.sum().backward()
    torch.testing.assert_close(hidden.grad, grad, atol=1e-12, rtol=0)

# -----------------------------------------------------------------------------
# 3. the reward is prompts.grade on the decoded rollout and the gold answer


def test_reward_is_prompts_grade_on_decoded_rollouts(world, tmp_path, monkeypatch):
    grade_calls, sampled = [], []
    real_grade, real_generate = prompts.grade, samplers.HFSampler.generate

    def recording_grade(completion, gold, timeout=5.0):
        real_grade(completion, gold, timeout)  # the real grader accepts what it is given
        grade_calls.append((completion, gold, parity_reward(completion, gold)))
        return grade_calls[-1][2]

    def recording_generate(self, prompt_ids, n, *args, **kwargs):
        groups = real_generate(self, prompt_ids, n, *args, **kwargs)
        sampled.extend(s.ids for group in groups for s in group)
        return groups
    monkeypatch.setattr(prompts, "grade", recording_grade)
    monkeypatch.setattr(samplers.HFSampler, "generate", recording_generate)
    summary = grpo.main(run_args(world, tmp_path, "--max-steps", "1"))
    tokenizer = world["tokenizer"]
    records = prompts.load_records(world["data"])
    gold = [records[i]["answer"] for i in opsd.batch_indices(len(records), 0, 2, 0, 0, 1) for _ in range(4)]
    assert [c for c, _, _ in grade_calls] == [tokenizer.decode(r, skip_special_tokens=True) for r in sampled]
    assert [g for _, g, _ in grade_calls] == gold
    assert len(sampled) == 8 and len({tuple(s) for s in sampled}) == 8  # the group's samples differ
    assert summary["rollout_acc"] == pytest.approx(sum(r for _, _, r in grade_calls) / 8)
    assert summary["generated_tokens"] == summary["generated_tokens_total"] == sum(len(r) for r in sampled)

# -----------------------------------------------------------------------------
# 4. one update moves the policy in the direction of the advantage


def test_update_raises_positive_and_lowers_negative_advantage_rollouts(world):
    torch.manual_seed(0)
    model, tokenizer = models.load_model(world["model"], torch.device("cpu"),
                                       lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    prompt = prompts.student_prompt_ids(tokenizer, "What is 123*4?")
    rollouts = [prompts.completion_ids(tokenizer, text) for text in
                ["3*4+0=12\n\\boxed{492}", "hello world", "\\boxed{7}", "9*9+8=89\n2*4+1=9"]]
    advantages = grpo.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]])).flatten()  # (+, -, -, +)
    batch = opsd.build_batch([prompt] * 4, rollouts, tokenizer.pad_token_id, torch.device("cpu"))
    def logp():
        return grpo.rollout_logprobs(opsd.completion_hidden(model, batch), models.lm_parts(model)[1], batch["targets"],
                                     1.0, 16)
    with torch.no_grad():
        before = torch.stack([part.sum() for part in logp().split(batch["lengths"].tolist())])
    # a LoRA adapter starts at B = 0, so the first step only moves B: take a few small SGD steps
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    weights = torch.cat([torch.full((n,), 1 / (4 * n)) for n in batch["lengths"].tolist()])
    for _ in range(3):
        out = grpo.grpo_token_loss(logp(), advantages.repeat_interleave(batch["lengths"]))
        (out["loss"] * weights).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        change = torch.stack([part.sum() for part in logp().split(batch["lengths"].tolist())]) - before
    assert (change[advantages > 0] > 0).all() and (change[advantages < 0] < 0).all(), change

# -----------------------------------------------------------------------------
# 5. resume: 2 steps + --resume + 2 steps is the 4-step run, bit for bit


def adapter(out_dir, step):
    return load_file(os.path.join(out_dir, f"checkpoint-{step:06d}", "adapter_model.safetensors"))


def test_resume_equals_uninterrupted_run(world, tmp_path, monkeypatch):
    monkeypatch.setattr(prompts, "grade", parity_reward)
    full = grpo.main(run_args(world, tmp_path / "full", "--max-steps", "4", "--save-every", "2"))
    # the same run stopped after step 2: a fresh out dir that starts from the step-2 checkpoint alone
    resumed = grpo.main(run_args(world, tmp_path / "resumed", "--max-steps", "4", "--save-every", "2",
                                 "--resume", str(tmp_path / "full" / "checkpoint-000002")))
    final_full, final_resumed = adapter(tmp_path / "full", 4), adapter(tmp_path / "resumed", 4)
    assert any(v.abs().sum() > 0 for k, v in final_full.items() if "lora_B" in k)  # the policy did move
    assert final_full.keys() == final_resumed.keys()
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    for key in ["loss", "rollout_acc", "zero_adv_groups", "generated_tokens", "generated_tokens_total", "lr",
                "grad_norm"]:
        assert full[key] == resumed[key], key
    log = [json.loads(line) for line in open(tmp_path / "resumed" / "log.jsonl")]
    assert [r["step"] for r in log] == [3, 4]


def test_ppo_epochs_reuse_the_rollouts_and_the_schedule_counts_updates(world, tmp_path, monkeypatch):
    monkeypatch.setattr(prompts, "grade", parity_reward)
    grpo.main(run_args(world, tmp_path, "--max-steps", "2", "--ppo-epochs", "2", "--kl-beta", "0.1"))
    first, second = [json.loads(line) for line in open(tmp_path / "log.jsonl")][:2]
    assert first["zero_adv_groups"] < 1  # there was a signal to follow
    assert first["kl"] > 0  # the second epoch scores a policy that has moved off the reference
    # 2 steps x 2 epochs = 4 updates, 1 of warmup, then cosine over 3; the log holds the lr each step's last
    # update used: update 1 -> cos(0) = peak, update 3 -> 0.5 (1 + cos(2 pi / 3)) = 0.25 peak
    assert first["lr"] == pytest.approx(1e-2)
    assert second["lr"] == pytest.approx(0.25e-2)


def test_the_step_line_shows_reward_and_gradient_not_a_loss_that_is_zero_by_construction(world, tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.setattr(prompts, "grade", parity_reward)
    summary = grpo.main(run_args(world, tmp_path, "--max-steps", "1"))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("step 1/1"))
    assert "reward" in line and "grad norm" in line and "loss" not in line
    # the loss is 0 with one epoch (to rounding); its gradient is not
    assert abs(summary["loss"]) < 1e-6 and summary["grad_norm"] > 0


def test_a_bf16_step_matches_the_fp32_step(world, tmp_path, monkeypatch):
    """The same rollouts and rewards scored in bf16 and in fp32 (test_opsd.py gives the tolerance's reasoning): the
    gradient's direction within cos 0.99 (the loss is 0 by construction), the adapter fp32."""
    monkeypatch.setattr(prompts, "grade", parity_reward)

    def fixed_rollouts(self, prompt_ids, n, sampling, seeds, lora_request=None):
        def ids(seed, length):
            return torch.randint(3, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
        return [[samplers.Sample(ids(s + j, 5 + j), None) for j in range(n)] for s in seeds]
    monkeypatch.setattr(samplers.HFSampler, "generate", fixed_rollouts)
    grads, real = {}, opsd.update

    def update(params, *args, **kwargs):
        grads[len(grads)] = torch.cat([p.grad.flatten().double() for p in params]), {p.dtype for p in params}
        return real(params, *args, **kwargs)
    monkeypatch.setattr(opsd, "update", update)
    for dtype in ("float32", "bfloat16"):
        grpo.main(run_args(world, tmp_path / dtype, "--max-steps", "1", "--dtype", dtype))
    (g32, _), (g16, dtypes) = grads[0], grads[1]
    assert g32.abs().max() > 0 and torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert dtypes == {torch.float32}

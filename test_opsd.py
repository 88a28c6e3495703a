"""The specification of opsd.py: the loss against float64 references, padding, the fixed teacher, learning,
data parallelism, resume, the NaN stop and the command line. CPU only, tiny models built here.

  python -m pytest -q test_opsd.py
"""
import json
import math
import os
from contextlib import nullcontext
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import common
import lm
import opsd
import prompts
import toy

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# 0. fixtures: a tiny Qwen3 (hidden 32, 2 layers) and 32 toy problems, built once per session. The init is
# wider than the default 0.02 so the logits are O(1): with near-uniform softmaxes every divergence is ~1e-5
# and a test of "the loss went down" or "the weights changed" could pass by rounding.


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return toy.build_tiny(tmp_path_factory.mktemp("opsd_world"), initializer_range=0.3)


def run_args(world, out_dir, *extra):
    """argv for a short opsd.main run on the tiny model (high lr, so a few steps visibly move the adapter)."""
    return ["--model", world["model"], "--data", world["data"], "--batch-size", "4", "--micro-batch-size", "2",
            "--max-new-tokens", "16", "--lora-r", "8", "--lora-alpha", "16", "--lr", "1e-2",
            "--out-dir", str(out_dir), *extra]


TEMPERATURE = 1.1  # opsd.py's default: not 1, so the scaling of both logits is exercised
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def token_fn(teacher_weight, **options):
    return opsd.opsd_token_fn(teacher_weight, temperature=options.pop("temperature", TEMPERATURE), **options)


def load_lora_model(world):
    return lm.load_model(world["model"], torch.device("cpu"), lora=LORA)


def capture_run(monkeypatch):
    """Patch common.setup_run so a test can reach the model and the initial trainable weights of opsd.main's run."""
    captured, real = {}, common.setup_run

    def setup_run(args, *rest, **kwargs):
        run = real(args, *rest, **kwargs)
        captured["args"], captured["run"], captured["initial"] = args, run, [p.detach().clone() for p in run.params]
        return run
    monkeypatch.setattr(common, "setup_run", setup_run)
    return captured


def adapter_weights(checkpoint):
    from safetensors.torch import load_file
    return load_file(os.path.join(checkpoint, "adapter_model.safetensors"))

# -----------------------------------------------------------------------------
# 1. the loss against naive float64 references: full logits, the divergences written out from p and m


def reference_jsd(student_logits, teacher_logits, beta):
    """JSD_beta(p_T || p_S) per row from explicit probabilities: beta=0 forward KL, beta=1 reverse KL,
    else beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S."""
    p_student, p_teacher = student_logits.softmax(-1), teacher_logits.softmax(-1)
    if beta == 0:
        return (p_teacher * (p_teacher.log() - p_student.log())).sum(-1)
    if beta == 1:
        return (p_student * (p_student.log() - p_teacher.log())).sum(-1)
    m = beta * p_teacher + (1 - beta) * p_student
    return (beta * (p_teacher * (p_teacher.log() - m.log())).sum(-1)
            + (1 - beta) * (p_student * (p_student.log() - m.log())).sum(-1))


def loss_problem(n=37, hidden=16, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(student_hidden=torch.randn(n, hidden, generator=generator),
                teacher_hidden=torch.randn(n, hidden, generator=generator),
                weight=torch.randn(vocab, hidden, generator=generator) * 0.5,
                targets=torch.randint(vocab, (n,), generator=generator),
                token_weights=torch.rand(n, generator=generator) + 0.1)  # non-uniform on purpose


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["lora", "full_finetune"])
def test_chunked_jsd_matches_float64_reference(beta, weight_grad):
    problem = loss_problem()
    temperature = TEMPERATURE
    # reference: all N x V logits at once, float64, autograd through the explicit formula
    hidden64 = problem["student_hidden"].double().requires_grad_()
    weight64 = problem["weight"].double().requires_grad_(weight_grad)
    divergence64 = reference_jsd(hidden64 @ weight64.T / temperature,
                                 problem["teacher_hidden"].double() @ problem["weight"].double().T / temperature, beta)
    loss64 = (divergence64 * problem["token_weights"].double()).sum()
    loss64.backward()
    assert loss64.item() > 1e-2  # not a trivially-zero case
    for chunk_size in [1, 5, 16, 37, 64]:  # 5 and 16 leave a ragged last chunk; 64 > N
        hidden = problem["student_hidden"].clone().requires_grad_()
        weight = problem["weight"].clone().requires_grad_(weight_grad)
        stats = {}
        # the teacher's head is a separate tensor without grad, as in opsd.main under full fine-tuning
        loss = lm.chunked_loss(hidden, weight, problem["token_weights"], token_fn(problem["weight"].clone(), beta=beta),
                               (problem["teacher_hidden"], problem["targets"]), chunk_size, stats)
        loss.backward()
        assert abs(loss.item() - loss64.item()) < 1e-5, chunk_size
        assert abs(stats["divergence"] - loss64.item()) < 1e-5, chunk_size
        assert (hidden.grad.double() - hidden64.grad).abs().max().item() < 1e-5, chunk_size
        if weight_grad:
            assert (weight.grad.double() - weight64.grad).abs().max().item() < 1e-5, chunk_size
        else:
            assert weight.grad is None


def test_chunked_loss_scales_gradient_by_upstream():
    # backward multiplies the stored gradient by the incoming one: 3 * loss has 3x the gradient
    problem = loss_problem(seed=1)
    grads = []
    for factor in [1.0, 3.0]:
        hidden = problem["student_hidden"].clone().requires_grad_()
        loss = lm.chunked_loss(hidden, problem["weight"], problem["token_weights"], token_fn(problem["weight"], beta=0.5),
                               (problem["teacher_hidden"], problem["targets"]), 8)
        (factor * loss).backward()
        grads.append(hidden.grad)
    torch.testing.assert_close(grads[1], 3 * grads[0])

# -----------------------------------------------------------------------------
# 2. generalized_jsd itself


def test_generalized_jsd_is_nonnegative_and_zero_on_identical_inputs():
    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(200, 30, generator=generator) * 3, torch.randn(200, 30, generator=generator) * 3
    for beta in [0.0, 0.1, 0.5, 0.9, 1.0]:
        divergence = opsd.generalized_jsd(student, teacher, beta)
        assert divergence.shape == (200,)
        assert divergence.min().item() >= -1e-6, beta
        assert divergence.mean().item() > 0.1, beta
        assert opsd.generalized_jsd(student, student.clone(), beta).abs().max().item() < 1e-5, beta


def test_generalized_jsd_endpoints_are_forward_and_reverse_kl():
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(50, 30, generator=generator) * 2, torch.randn(50, 30, generator=generator) * 2
    p_student, p_teacher = student.double().softmax(-1), teacher.double().softmax(-1)
    forward_kl = (p_teacher * (p_teacher / p_student).log()).sum(-1)  # KL(p_T || p_S)
    reverse_kl = (p_student * (p_student / p_teacher).log()).sum(-1)  # KL(p_S || p_T)
    assert (forward_kl - reverse_kl).abs().max() > 0.1  # the two differ, so swapping them would fail
    torch.testing.assert_close(opsd.generalized_jsd(student, teacher, 0.0).double(), forward_kl, atol=1e-5, rtol=0)
    torch.testing.assert_close(opsd.generalized_jsd(student, teacher, 1.0).double(), reverse_kl, atol=1e-5, rtol=0)
    torch.testing.assert_close(opsd.generalized_jsd(student, teacher, 0.3).double(),
                               reference_jsd(student.double(), teacher.double(), 0.3), atol=1e-5, rtol=0)

# -----------------------------------------------------------------------------
# 3. the sampled-token loss, --clip, --top-k


def test_sampled_loss_gradient_is_advantage_times_score():
    problem = loss_problem(n=12, seed=4)
    temperature = TEMPERATURE
    student_logits = (problem["student_hidden"] @ problem["weight"].T).requires_grad_()
    out = token_fn(problem["weight"], loss="sampled")(student_logits, problem["teacher_hidden"], problem["targets"])
    out["loss"].sum().backward()
    # d/dz [-A log softmax(z / t)_y] = -A (onehot(y) - p_S) / t, with A = log p_T(y) - log p_S(y) held fixed
    with torch.no_grad():
        logp_student = (student_logits / temperature).log_softmax(-1)
        logp_teacher = (problem["teacher_hidden"] @ problem["weight"].T / temperature).log_softmax(-1)
        rows = torch.arange(12)
        advantage = logp_teacher[rows, problem["targets"]] - logp_student[rows, problem["targets"]]
        onehot = F.one_hot(problem["targets"], student_logits.shape[1]).float()
        expected = -advantage[:, None] * (onehot - logp_student.exp()) / temperature
    assert advantage.abs().min() > 1e-3
    torch.testing.assert_close(student_logits.grad, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["divergence"], -advantage)


def test_token_clip_caps_the_summed_divergence():
    problem = loss_problem(n=20, seed=5)
    student_logits = problem["student_hidden"] @ problem["weight"].T

    def per_token_grads(**options):
        logits = student_logits.clone().requires_grad_()
        out = token_fn(problem["weight"], **options)(logits, problem["teacher_hidden"], problem["targets"])
        grads = [torch.autograd.grad(out["loss"][i], logits, retain_graph=True)[0][i] for i in range(len(logits))]
        return out, torch.stack(grads)
    free, free_grads = per_token_grads(beta=0.5)
    cap = free["divergence"].median().item()
    clipped, clipped_grads = per_token_grads(beta=0.5, token_clip=cap)
    above = free["divergence"] > cap
    assert 0 < above.sum() < len(above)
    torch.testing.assert_close(clipped["loss"], free["divergence"].clamp(max=cap))
    torch.testing.assert_close(clipped["divergence"], free["divergence"])  # the log still shows the real divergence
    assert clipped_grads[above].abs().max() == 0
    torch.testing.assert_close(clipped_grads[~above], free_grads[~above])
    assert free_grads[above].abs().max() > 0


def test_top_k_restricts_to_teacher_top_k_renormalised():
    problem = loss_problem(n=20, seed=6)
    temperature = TEMPERATURE
    student_logits = (problem["student_hidden"] @ problem["weight"].T).requires_grad_()
    out = token_fn(problem["weight"], beta=0.5, loss_top_k=5)(student_logits, problem["teacher_hidden"], problem["targets"])
    out["loss"].sum().backward()
    # direct: keep the 5 columns where the teacher is highest, renormalise both, JSD on 5 entries
    logits64 = student_logits.detach().double().requires_grad_()
    teacher64 = problem["teacher_hidden"].double() @ problem["weight"].double().T
    top = teacher64.topk(5, dim=-1).indices
    expected = reference_jsd(logits64.gather(-1, top) / temperature, teacher64.gather(-1, top) / temperature, 0.5)
    expected.sum().backward()
    torch.testing.assert_close(out["loss"].double(), expected.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(student_logits.grad.double(), logits64.grad, atol=1e-6, rtol=0)
    assert (student_logits.grad != 0).sum(-1).max() == 5  # no gradient outside the teacher's top 5
    full = token_fn(problem["weight"], beta=0.5)(student_logits.detach(), problem["teacher_hidden"], problem["targets"])
    assert (full["loss"] - out["loss"].detach()).abs().max() > 1e-3  # top-k really changed something

# -----------------------------------------------------------------------------
# 4. sequences: left padding, rows, lengths


def test_build_batch_layout_and_length_masking(world):
    tokenizer = world["tokenizer"]
    pad = tokenizer.pad_token_id
    eos = prompts.stop_token_ids(tokenizer)[0]
    prompt_ids = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    # completions ending in the pad id and in EOS, one with a pad id inside: all counted by length, not by id
    completions = [[20, 21, pad], [22, eos], [pad, 23, 24, 25, pad]]
    batch = lm.build_batch(prompt_ids, completions, pad, torch.device("cpu"))
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completions))
    assert batch["input_ids"].shape == (3, width)
    assert batch["lengths"].tolist() == [3, 2, 5]
    assert batch["targets"].tolist() == [t for c in completions for t in c]
    assert len(batch["row_batch"]) == len(batch["row_pos"]) == 10
    for b, (prompt, completion) in enumerate(zip(prompt_ids, completions)):
        mask = batch["attention_mask"][b]
        n = len(prompt) + len(completion)
        # left padding only: a run of zeros, then ones up to the last column (no pad between prompt and rollout)
        assert mask.tolist() == [0] * (width - n) + [1] * n
        assert batch["input_ids"][b, width - n:].tolist() == prompt + completion
        assert batch["position_ids"][b, width - n:].tolist() == list(range(n))
        # row j of this sequence is the position just before completion token j
        rows = batch["row_pos"][batch["row_batch"] == b]
        assert (batch["input_ids"][b, rows + 1]).tolist() == completion
        assert rows.tolist() == list(range(width - len(completion) - 1, width - 1))
    weights = lm.sequence_mean_weights(batch["lengths"], 3)
    assert torch.allclose(weights, torch.tensor([1 / 9] * 3 + [1 / 6] * 2 + [1 / 15] * 5))


def test_padded_batch_scores_equal_unpadded(world):
    model, tokenizer = load_lora_model(world)
    torch.manual_seed(7)
    with torch.no_grad():  # a non-zero adapter, so student (adapter on) and teacher (adapter off) differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.eval()
    records = toy.make_records("train", 3, 1)
    student_prompts = [prompts.student_prompt_ids(tokenizer, r["problem"]) for r in records]
    teacher_prompts = [prompts.teacher_prompt_ids(tokenizer, r) for r in records]
    assert len({len(p) for p in student_prompts}) > 1 and len({len(p) for p in teacher_prompts}) > 1
    eos = prompts.stop_token_ids(tokenizer)[0]
    completions = [[40, 41, 42, 43, eos], [50, 51, 52, tokenizer.pad_token_id], [60] * 9 + [eos]]
    body, weight = lm.lm_parts(model)
    for prompt_ids, adapter in [(student_prompts, True), (teacher_prompts, False)]:
        # pad with the EOS id, as for a tokenizer whose pad is its EOS: masking must be by length
        batch = lm.build_batch(prompt_ids, completions, eos, torch.device("cpu"))
        with torch.no_grad(), (nullcontext() if adapter else model.disable_adapter()):
            logp_padded = (lm.completion_hidden(model, batch) @ weight.T).log_softmax(-1)  # (N, V)
            alone = []
            for prompt, completion in zip(prompt_ids, completions):
                ids = torch.tensor([prompt + completion])
                hidden = body(input_ids=ids).last_hidden_state[0]  # no mask, no padding
                alone.append(hidden[len(prompt) - 1:len(ids[0]) - 1])
            logp_alone = (torch.cat(alone) @ weight.T).log_softmax(-1)
        assert logp_padded.shape == (sum(map(len, completions)), weight.shape[0])
        assert (logp_padded - logp_alone).abs().max().item() < 1e-5, "student" if adapter else "teacher"
    # and the adapter really makes the two scorers differ (so the loop above compared two different models)
    batch = lm.build_batch(student_prompts, completions, eos, torch.device("cpu"))
    with torch.no_grad():
        on = lm.completion_hidden(model, batch)
        with model.disable_adapter():
            off = lm.completion_hidden(model, batch)
    assert (on - off).abs().max() > 1e-2

# -----------------------------------------------------------------------------
# 5. training: the fixed teacher never moves, a few steps lower the divergence


def test_fixed_teacher_is_bit_identical_after_training(world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    captured = capture_run(monkeypatch)
    opsd.main(run_args(world, tmp_path / "run", "--max-steps", "3", "--save-every", "10"))
    model = captured["run"].model
    initial = AutoModelForCausalLM.from_pretrained(world["model"])
    ids = torch.tensor([prompts.student_prompt_ids(world["tokenizer"], "What is 123*4?")])
    model.eval()
    with torch.no_grad():
        with opsd.teacher_weights(model, captured["args"].teacher_weights, False, None):  # the loop's own way to get the teacher
            teacher_logits = model(input_ids=ids).logits
        student_logits = model(input_ids=ids).logits
        initial_logits = initial(input_ids=ids).logits
    assert torch.equal(teacher_logits, initial_logits)
    # every base weight untouched (PEFT renames a wrapped layer's weight to <layer>.base_layer.weight)
    base = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    assert base.keys() == initial.state_dict().keys()
    for name, value in initial.state_dict().items():
        assert torch.equal(base[name], value), name
    changed = [not torch.equal(a, p.detach()) for a, p in zip(captured["initial"], captured["run"].params)]
    assert all(changed)  # with a high lr every LoRA matrix moved (lora_A too, once lora_B is non-zero)
    assert (student_logits - teacher_logits).abs().max() > 1e-3


def test_teacher_modes_live_ema_and_full_finetune_swap_in_and_back(world):
    model, tokenizer = load_lora_model(world)
    params = lm.trainable_parameters(model)
    with torch.no_grad():
        for p in params:  # a trained adapter: every LoRA matrix non-zero
            p.normal_(0, 0.5)
    ids = torch.tensor([prompts.student_prompt_ids(tokenizer, "What is 123*4?")])
    model.eval()
    logits = lambda: model(input_ids=ids).logits
    with torch.no_grad():
        student = logits()
        with model.disable_adapter():
            base = logits()
        with opsd.teacher_weights(model, "live", False, None):
            live = logits()
        # EMA: the copy's weights are used inside the context, and the trained ones are back, exactly, after
        ema_copy = [torch.zeros_like(p) for p in params]  # zero LoRA weights = the base model
        before = [p.detach().clone() for p in params]
        with opsd.teacher_weights(model, "ema", False, ema_copy):
            ema = logits()
        after = [p.detach().clone() for p in params]
    assert torch.equal(live, student) and not torch.allclose(student, base)
    assert torch.allclose(ema, base, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.count_nonzero(c) == 0 for c in ema_copy)  # the copy is swapped back too
    # full fine-tuning with a fixed teacher: the frozen initial copy is swapped in the same way
    full = lm.load_model(world["model"], torch.device("cpu"))[0]
    full.eval()
    initial = [p.detach().clone() for p in lm.trainable_parameters(full)]
    with torch.no_grad():
        initial_logits = full(input_ids=ids).logits
        for p in lm.trainable_parameters(full):
            p.add_(0.1)
        with opsd.teacher_weights(full, "fixed", True, initial):
            teacher_logits = full(input_ids=ids).logits
    assert torch.equal(teacher_logits, initial_logits)


def test_a_few_steps_lower_the_divergence(world):
    model, tokenizer = load_lora_model(world)
    records = toy.make_records("train", 4, 2)
    student_prompts = [prompts.student_prompt_ids(tokenizer, r["problem"]) for r in records]
    teacher_prompts = [prompts.teacher_prompt_ids(tokenizer, r) for r in records]
    generator = torch.Generator().manual_seed(8)
    rollouts = [torch.randint(3, len(tokenizer), (n,), generator=generator).tolist() for n in [6, 9, 12, 15]]
    student_batch = lm.build_batch(student_prompts, rollouts, tokenizer.pad_token_id, torch.device("cpu"))
    teacher_batch = lm.build_batch(teacher_prompts, rollouts, tokenizer.pad_token_id, torch.device("cpu"))
    _, weight = lm.lm_parts(model)
    with torch.no_grad(), model.disable_adapter():
        teacher_hidden = lm.completion_hidden(model, teacher_batch)  # fixed: computed once
    token_weights = lm.sequence_mean_weights(student_batch["lengths"], 4)
    optimizer = torch.optim.AdamW(lm.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = lm.chunked_loss(lm.completion_hidden(model, student_batch), weight, token_weights, token_fn(weight.detach(), beta=0.5),
                               (teacher_hidden, student_batch["targets"]), chunk_size=7)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 1e-2
    assert losses[-1] < 0.7 * losses[0], losses

# -----------------------------------------------------------------------------
# 6. data parallelism: torchrun, 2 CPU ranks (gloo), different problems per rank, identical weights after


DDP_WRAPPER = textwrap.dedent("""
    import sys
    import torch
    import common
    import opsd
    captured, real = {}, common.setup_run
    def trainable(model):  # PEFT's names, less the adapter name, are the keys of the saved adapter file
        return {name.replace(".default", ""): p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    def setup_run(*args, **kwargs):
        captured["run"] = run = real(*args, **kwargs)
        captured["initial"] = trainable(run.model)
        return run
    common.setup_run = setup_run
    opsd.main(sys.argv[2:])
    run = captured["run"]
    torch.save({"initial": captured["initial"], "final": trainable(run.model)}, f"{sys.argv[1]}/rank{run.rank}.pt")
""")


def test_two_ranks_end_with_identical_weights(world, tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(DDP_WRAPPER)
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
               str(tmp_path), *run_args(world, tmp_path / "run", "--max-steps", "2", "--save-every", "1")]
    result = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 ranks x 2" in result.stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    saved = adapter_weights(tmp_path / "run" / "checkpoint-000002")
    assert saved.keys() == ranks[0]["final"].keys() == ranks[1]["final"].keys()
    for name in saved:
        assert torch.equal(ranks[0]["initial"][name], ranks[1]["initial"][name]), name  # same LoRA init everywhere
        # the ranks saw different problems: their weights agree only because the gradients were averaged
        assert torch.equal(ranks[0]["final"][name], ranks[1]["final"][name]), name
        assert torch.equal(saved[name], ranks[1]["final"][name]), name
        assert not torch.equal(ranks[0]["final"][name], ranks[0]["initial"][name]), name

# -----------------------------------------------------------------------------
# 7. resume and the NaN stop


class StopAfter(Exception):
    pass


def stop_after_checkpoint(monkeypatch, at_step, action):
    """Run `action` right after opsd.main writes the checkpoint of step `at_step` (1-based)."""
    real = common.save_checkpoint

    def save_checkpoint(run, args, step, *rest, **kwargs):
        path = real(run, args, step, *rest, **kwargs)
        if step == at_step:
            action()
        return path
    monkeypatch.setattr(common, "save_checkpoint", save_checkpoint)


def test_resume_continues_exactly(world, tmp_path, monkeypatch):
    opsd.main(run_args(world, tmp_path / "straight", "--max-steps", "4", "--save-every", "2"))
    with monkeypatch.context() as patch:  # the same run, killed right after its step-2 checkpoint
        stop_after_checkpoint(patch, 2, lambda: (_ for _ in ()).throw(StopAfter()))
        with pytest.raises(StopAfter):
            opsd.main(run_args(world, tmp_path / "split", "--max-steps", "4", "--save-every", "2"))
    assert not (tmp_path / "split" / "checkpoint-000004").exists()
    summary = opsd.main(run_args(world, tmp_path / "split", "--max-steps", "4", "--save-every", "2",
                                 "--resume", str(tmp_path / "split")))
    assert summary["step"] == 4
    straight = adapter_weights(tmp_path / "straight" / "checkpoint-000004")
    split = adapter_weights(tmp_path / "split" / "checkpoint-000004")
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name
    at_two = adapter_weights(tmp_path / "split" / "checkpoint-000002")
    assert any(not torch.equal(at_two[name], split[name]) for name in split)  # steps 3-4 did train


def test_resume_from_an_earlier_checkpoint_logs_each_step_once(world, tmp_path):
    out = tmp_path / "run"
    opsd.main(run_args(world, out, "--max-steps", "4", "--save-every", "2"))
    first = [json.loads(line) for line in open(out / "log.jsonl")]
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a line cut short by a crash
    opsd.main(run_args(world, out, "--max-steps", "4", "--save-every", "2", "--resume", str(out / "checkpoint-000002")))
    again = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in first] == [r["step"] for r in again] == [1, 2, 3, 4]
    assert again[:2] == first[:2]
    assert [r["loss"] for r in again[2:]] == [r["loss"] for r in first[2:]]  # steps 3-4 re-run exactly


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(world, tmp_path, monkeypatch):
    poisoned = {"on": False}
    stop_after_checkpoint(monkeypatch, 2, lambda: poisoned.update(on=True))
    real_loss = lm.chunked_loss
    monkeypatch.setattr(lm, "chunked_loss", lambda *a, **k: real_loss(*a, **k) * (math.nan if poisoned["on"] else 1.0))
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"step 3\b"):
        opsd.main(run_args(world, out, "--max-steps", "4", "--save-every", "2"))
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-000002", "latest", "log.jsonl"]
    checkpoint = common.follow_latest(str(out))
    assert checkpoint.endswith("checkpoint-000002")
    assert torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)["step"] == 2
    assert all(torch.isfinite(v).all() for v in adapter_weights(checkpoint).values())

# -----------------------------------------------------------------------------
# 8. the command line


def test_help_documents_every_option():
    result = subprocess.run([sys.executable, "opsd.py", "--help"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for action in opsd.get_parser()._actions:
        assert action.help and action.help.strip(), action.option_strings
        for option in action.option_strings:
            assert option in result.stdout, option

# -----------------------------------------------------------------------------
# 9. the authors' recipe and the follow-up options: per-entry clip, vOPD baseline, diagnostics, teacher context


def test_entry_clip_caps_each_vocabulary_term_and_can_push_the_teachers_favourite_down():
    """The official --jsd_token_clip, on 4 tokens: the teacher prefers token 0 (0.7 against the student's 0.1), so
    its forward-KL term 0.7 ln 7 = 1.36 is capped at 0.05. Its gradient then comes only through the softmax
    normaliser, and gradient descent *lowers* the token the teacher prefers; the loss itself is negative."""
    p_teacher = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    p_student = torch.tensor([0.1, 0.3, 0.3, 0.3], dtype=torch.float64)
    student_logits = p_student.log().requires_grad_()
    clipped = opsd.generalized_jsd(student_logits, p_teacher.log(), 0.0, entry_clip=0.05)
    clipped.backward()
    terms = p_teacher * (p_teacher.log() - p_student.log())  # [1.36, -0.11, -0.11, -0.11]
    assert clipped.item() == pytest.approx(0.05 + terms[1:].sum().item(), abs=1e-12) and clipped.item() < 0
    # d/dz_0 of the unclipped terms alone: p_S(0) * sum_{u unclipped} p_T(u) = 0.1 * 0.3, positive: z_0 goes down
    assert student_logits.grad[0].item() == pytest.approx(0.1 * 0.3, abs=1e-12)
    free = p_student.log().requires_grad_()
    opsd.generalized_jsd(free, p_teacher.log(), 0.0).backward()
    assert free.grad[0].item() == pytest.approx(0.1 - 0.7, abs=1e-12)  # without the clip: p_S - p_T < 0, z_0 goes up
    # the loss's --entry-clip path is this function
    problem = loss_problem(n=6, seed=9)
    logits = problem["student_hidden"] @ problem["weight"].T
    out = token_fn(problem["weight"], beta=0.0, entry_clip=0.05)(logits, problem["teacher_hidden"], problem["targets"])
    expected = opsd.generalized_jsd(logits / TEMPERATURE, problem["teacher_hidden"] @ problem["weight"].T / TEMPERATURE, 0.0, 0.05)
    torch.testing.assert_close(out["loss"], expected)


def test_vopd_baseline_leaves_the_expected_gradient_unchanged():
    """E_{y ~ p_S}[grad(-A(y) log p_S(y))] by exact enumeration over a 7-token vocabulary: with A = log p_T - log p_S
    and with the vOPD baseline A + KL(p_S || p_T) (a constant per position), the expectation is the same."""
    generator = torch.Generator().manual_seed(11)
    vocab = 7
    z = (torch.randn(vocab, generator=generator, dtype=torch.float64) * 2)
    teacher_hidden = torch.randn(vocab, vocab, generator=generator, dtype=torch.float64)
    teacher_hidden[:] = teacher_hidden[0]  # the same position, once per possible sampled token
    weight = torch.eye(vocab, dtype=torch.float64)  # teacher logits = teacher_hidden
    p_student = z.softmax(-1)

    def expected_gradient(baseline):
        leaf = z.clone().requires_grad_()
        out = token_fn(weight, temperature=1.0, loss="sampled", baseline=baseline)(leaf.expand(vocab, vocab), teacher_hidden, torch.arange(vocab))
        (out["loss"] * p_student).sum().backward()
        return leaf.grad, out["loss"].detach()
    plain, plain_losses = expected_gradient("none")
    vopd, vopd_losses = expected_gradient("vopd")
    torch.testing.assert_close(vopd, plain, atol=1e-12, rtol=0)
    assert (vopd_losses - plain_losses).abs().max() > 1e-3  # the per-sample losses (and gradients) do differ
    assert plain.abs().max() > 1e-3


def test_diagnostics_are_the_students_entropy_and_argmax_agreement():
    problem = loss_problem(n=10, seed=12)
    problem["teacher_hidden"] = problem["student_hidden"] + 0.7 * problem["teacher_hidden"]  # close: they agree sometimes
    logits = problem["student_hidden"] @ problem["weight"].T
    out = token_fn(problem["weight"], beta=0.5)(logits, problem["teacher_hidden"], problem["targets"])
    p = (logits / TEMPERATURE).double().softmax(-1)
    torch.testing.assert_close(out["entropy"].double(), -(p * p.log()).sum(-1), atol=1e-6, rtol=0)
    agree = (logits.argmax(-1) == (problem["teacher_hidden"] @ problem["weight"].T).argmax(-1)).float()
    assert torch.equal(out["agreement"], agree)
    assert 0 < agree.sum() < 10  # both cases occur, so a constant would fail
    assert [m.lower() for m in opsd.EPISTEMIC.findall("Wait, hmm... but maybe 3. Let me check: butter is waiting; PERHAPS.")] == \
        ["wait", "hmm", "but", "maybe", "let me check", "perhaps"]


def test_the_step_log_carries_the_diagnostics(world, tmp_path):
    summary = opsd.main(run_args(world, tmp_path, "--max-steps", "1"))
    assert 0 < summary["entropy"] and 0 <= summary["agreement"] <= 1 and summary["epistemic_per_1k"] >= 0
    assert json.loads(open(tmp_path / "log.jsonl").readline()).keys() >= {"entropy", "agreement", "epistemic_per_1k"}


@pytest.mark.parametrize("preset,expected", [
    ("paper", dict(loss="jsd", beta=0.5, entry_clip=0.0, thinking=True, max_new_tokens=2048, lr=2e-5, max_grad_norm=1.0)),
    ("authors", dict(loss="jsd", beta=0.0, entry_clip=0.05, thinking=False, max_new_tokens=1024, lr=5e-6, max_grad_norm=0.1,
                     temperature=1.1, top_p=0.95, sampling_top_k=20)),
])
def test_recipes_by_name_and_a_flag_still_wins(world, preset, expected):
    args = common.parse_config(opsd.get_parser(), ["--preset", preset, "--model", world["model"]])
    assert {k: getattr(args, k) for k in expected} == expected
    assert common.parse_config(opsd.get_parser(), ["--preset", preset, "--model", world["model"], "--lr", "1e-4"]).lr == 1e-4


def test_answer_only_teacher_sees_the_answer_and_not_the_solution(world, tmp_path, monkeypatch):
    seen, real = [], prompts.teacher_prompt_ids
    monkeypatch.setattr(prompts, "teacher_prompt_ids", lambda tokenizer, record, thinking, context: seen.append((record, context))
                        or real(tokenizer, record, thinking, context))
    opsd.main(run_args(world, tmp_path, "--max-steps", "1", "--teacher-context", "answer"))
    assert [context for _, context in seen] == ["answer"] * 4
    text = world["tokenizer"].decode(real(world["tokenizer"], seen[0][0], False, "answer"))
    assert seen[0][0]["answer"] in text and seen[0][0]["solution"].splitlines()[0] not in text

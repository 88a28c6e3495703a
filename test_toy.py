"""toy.py: the task, and a shortened end-to-end run of the README's first command (CI)."""
import json
import math
import os

import pytest

import opsd
import plumbing
import prompts
import toy


def test_task_splits_are_disjoint_and_solutions_are_right():
    train, test = toy.make_records("train", 500, 0), toy.make_records("test", 100, 0)
    assert not {(r["a"], r["b"]) for r in train} & {(r["a"], r["b"]) for r in test}
    for r in train[:50] + test[:50]:
        assert prompts.extract_boxed(r["solution"]) == r["answer"] == str(r["a"] * r["b"])
        own = toy.own_solution(r["a"], r["b"])
        assert prompts.extract_boxed(own) == r["answer"]
        assert len(own.splitlines()) == len(str(r["a"])) + 1  # one line per digit, then the box
    assert toy.own_solution(4738, 6) == "8*6+0=48\n3*6+4=22\n7*6+2=44\n4*6+4=28\n\\boxed{28428}"


def test_expert_references_are_right_end_in_the_gold_and_differ_from_the_students_style():
    import re
    # zero digits too
    pairs = [(r["a"], r["b"]) for r in toy.make_records("train", 300, 5)] + [(5007, 3), (100, 9), (90909, 2)]
    own_line = re.compile(r"^\d\*\d\+\d+=\d+$")
    for a, b in pairs:
        text = toy.expert_solution(a, b)
        head, box = text.split("\n")
        problem, terms, products, answer = head.split(" = ")
        assert problem == f"{a}*{b}" and int(answer) == a * b and prompts.extract_boxed(box) == str(a * b)
        # left to right, one partial product per nonzero digit at its place value, and they sum to the answer
        places = [int(d) * 10 ** i for i, d in enumerate(reversed(str(a))) if d != "0"][::-1]
        assert terms.split(" + ") == [f"{p}*{b}" for p in places]
        assert products.split(" + ") == [str(p * b) for p in places] and sum(p * b for p in places) == a * b
        assert prompts.grade(text, str(a * b))
        assert not any(own_line.match(line) for line in text.splitlines())  # not one line in the student's own style
    assert toy.expert_solution(3056, 7) == "3056*7 = 3000*7 + 50*7 + 6*7 = 21000 + 350 + 42 = 21392\n\\boxed{21392}"
    records = toy.make_records("test", 20, 0, references="expert")
    assert all(r["solution"] == toy.expert_solution(r["a"], r["b"]) for r in records)
    assert all(r["answer"] == str(r["a"] * r["b"]) for r in records)


def test_warm_start_mixes_student_teacher_and_mismatched_examples():
    def numbers(problem):  # "What is 4738*6?" -> (4738, 6)
        a, b = problem[len("What is "):-1].split("*")
        return int(a), int(b)
    rows = toy.warmstart_records(2000)
    own = [r for r in rows if not r.get("reference")]
    teacher = [r for r in rows if r.get("reference") == toy.own_solution(*numbers(r["problem"]))]
    mismatched = [r for r in rows if r.get("reference") and r not in teacher]  # another problem's reference
    shares = ((own, 1 - sum(toy.MIX.values())), (teacher, toy.MIX["teacher"]), (mismatched, toy.MIX["mismatched"]))
    for group, share in shares:
        assert abs(len(group) / len(rows) - share) < 0.03
    assert all(r["solution"] == r["reference"] for r in teacher + mismatched)  # the target is the reference


@pytest.mark.parametrize("references", ["own", "expert"])
def test_toy_world_end_to_end_quick(tmp_path, monkeypatch, references):
    monkeypatch.setenv("OPSD_TOY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "opsd"
    result = toy.main(["--quick", "--references", references, "--out-dir", str(out)])
    for key in ("student_before", "student_after", "teacher"):
        assert 0.0 <= result[key] <= 1.0
    assert result["steps"] == 4 and result["generated_tokens"] > 0
    steps = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:
        assert math.isfinite(s["loss"]) and s["loss"] >= 0 and 0 <= s["rollout_acc"] <= 1
        assert 0 < s["rollout_len"] <= toy.PRESETS["opsd"]["max_new_tokens"]
    assert os.path.exists(os.path.join(out, "checkpoint-000004", "adapter_model.safetensors"))
    # the warm start is a full model (trained from scratch), not an adapter
    assert os.path.exists(tmp_path / "cache" / references / "warm" / "model.safetensors")
    records = prompts.load_records(str(tmp_path / "cache" / references / "test.jsonl"))
    assert all(r["solution"] == toy.REFERENCES[references](*map(int, r["problem"][8:-1].split("*"))) for r in records)


def test_a_script_in_the_toy_world_gets_the_toy_settings_and_its_own_flags_win(tmp_path, monkeypatch):
    monkeypatch.setenv("OPSD_TOY_CACHE", str(tmp_path / "cache"))
    p = toy.paths("own")
    seen = []
    monkeypatch.setattr(opsd, "main", lambda argv: seen.append(plumbing.parse_config(opsd.get_parser(), argv)))
    os.makedirs(p["warm"])
    with open(os.path.join(p["warm"], "config.json"), "w") as f:
        f.write("{}")
    toy.main(["opsd", "--lr", "3e-4", "--seed", "7"])
    args = seen[0]
    assert args.model == p["warm"] and args.data == p["train"] and args.eval_data == p["test"]
    assert (args.lora_r, args.batch_size, args.max_new_tokens, args.thinking, args.compile) == \
        (16, 32, 96, False, False)
    assert (args.lr, args.seed) == (3e-4, 7)  # the flags after the toy settings win
    assert args.out_dir == "runs/toy/opsd"


@pytest.mark.parametrize("script", sorted(toy.SCRIPTS))
def test_every_scripts_toy_settings_are_options_of_that_script(script, tmp_path, monkeypatch):
    """`python toy.py SCRIPT` for every script: its toy settings parse with that script's own parser."""
    monkeypatch.setenv("OPSD_TOY_CACHE", str(tmp_path / "cache"))
    args = toy.SCRIPTS[script].get_parser().parse_args(toy.script_argv(script))
    assert args.model == toy.paths("own")["warm"] and args.max_new_tokens == 96


def test_the_toy_world_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("OPSD_TOY_CACHE", str(tmp_path / "empty"))
    with pytest.raises(prompts.UserError, match=r"no toy warm start at .*`python toy.py prepare --references own`"):
        toy.main(["opsd"])
    assert not (tmp_path / "empty").exists()  # nothing was built while checking
    (tmp_path / "not_a_model").mkdir()  # the user's own --model: its error, not advice to rebuild the toy world
    with pytest.raises(prompts.UserError, match=r"--model .*not_a_model: no config.json there"):
        toy.main(["opsd", "--model", str(tmp_path / "not_a_model")])

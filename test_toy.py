"""toy.py: the task, and a shortened end-to-end run of the README's first command (CI)."""
import json
import math
import os

import common
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


def test_warm_start_mixes_student_teacher_and_mismatched_examples():
    def numbers(problem):  # "What is 4738*6?" -> (4738, 6)
        a, b = problem[len("What is "):-1].split("*")
        return int(a), int(b)
    rows = toy.warmstart_records(2000)
    own = [r for r in rows if not r.get("reference")]
    teacher = [r for r in rows if r.get("reference") == toy.own_solution(*numbers(r["problem"]))]
    mismatched = [r for r in rows if r.get("reference") and r not in teacher]  # another problem's reference
    for group, share in ((own, 0.45), (teacher, 0.20), (mismatched, 0.35)):
        assert abs(len(group) / len(rows) - share) < 0.03
    assert all(r["solution"] == r["reference"] for r in teacher + mismatched)  # the target is the reference


def test_toy_world_end_to_end_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("OPSD_TOY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "opsd"
    result = toy.main(["--quick", "--out-dir", str(out)])
    for key in ("student_before", "student_after", "teacher"):
        assert 0.0 <= result[key] <= 1.0
    assert result["steps"] == 4 and result["generated_tokens"] > 0
    steps = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:
        assert math.isfinite(s["loss"]) and s["loss"] >= 0 and 0 <= s["rollout_acc"] <= 1
        assert 0 < s["rollout_len"] <= common.TOY["opsd"]["max_new_tokens"]
    assert os.path.exists(os.path.join(out, "checkpoint-000004", "adapter_model.safetensors"))
    # the warm start is a full model (trained from scratch), not an adapter
    assert os.path.exists(tmp_path / "cache" / "own" / "warm" / "model.safetensors")

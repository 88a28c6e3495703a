"""The specification of prompts.py: templates, token ids, data loading, answer extraction and the grader.

  python -m pytest -q test_prompts.py
"""
import json
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest

import prompts
import toy

HERE = os.path.dirname(os.path.abspath(__file__))


def boxed(answer):
    """A realistic completion ending in a boxed answer."""
    return f"Let me work through this.\nSo the final answer is $\\boxed{{{answer}}}$."

# -----------------------------------------------------------------------------
# 1. the grader table: (completion, gold, expected). Conventions follow MATH / AIME grading: an answer is
# right when it is the same mathematical object, however it is spelled.


GRADER_TABLE = [
    # fractions, decimals, radicals, pi: equal only up to mathematics, not as strings
    ("half_decimal_vs_frac", boxed("0.5"), "\\frac{1}{2}", True),
    ("frac_shorthand_vs_decimal", boxed("\\frac12"), "0.5", True),
    ("dfrac_vs_decimal", boxed("\\dfrac{3}{4}"), "0.75", True),
    ("tfrac_vs_frac", boxed("\\tfrac{1}{2}"), "\\frac{1}{2}", True),
    ("unreduced_fraction", boxed("\\frac{2}{4}"), "\\frac{1}{2}", True),
    ("decimal_vs_improper_fraction", boxed("\\frac{3}{2}"), "1.5", True),
    ("slash_fraction", boxed("1/2"), "\\frac{1}{2}", True),
    ("negative_frac_forms", boxed("-\\frac12"), "\\frac{-1}{2}", True),
    ("negative_decimal_vs_frac", boxed("-0.5"), "-\\frac{1}{2}", True),
    ("simplified_radical", boxed("2\\sqrt{3}"), "\\sqrt{12}", True),
    ("unsimplified_radical", boxed("\\sqrt{12}"), "2\\sqrt{3}", True),
    ("sqrt_without_braces_in_gold", boxed("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt3}{2}", True),
    ("rationalised_denominator", boxed("\\frac{1}{\\sqrt{2}}"), "\\frac{\\sqrt{2}}{2}", True),
    ("pi_over_two_forms", boxed("\\pi/2"), "\\dfrac{\\pi}{2}", True),
    ("sum_of_fractions", boxed("\\frac{1}{2}+\\frac{1}{3}"), "\\frac56", True),
    ("power_vs_value", boxed("2^{10}"), "1024", True),
    ("binomial_vs_value", boxed("\\binom{5}{2}"), "10", True),
    ("aime_leading_zero", boxed("33"), "033", True),
    # intervals, sets, tuples
    ("interval_left_right", boxed("\\left(-\\infty, 3\\right]"), "(-\\infty,3]", True),
    ("interval_union_order", boxed("(-\\infty,-1)\\cup(1,\\infty)"), "(1,\\infty)\\cup(-\\infty,-1)", True),
    ("interval_with_membership", boxed("x \\in [1,2]"), "[1,2]", True),
    ("set_order", boxed("\\{2,1\\}"), "\\{1,2\\}", True),
    ("solution_list_order", boxed("3, 2"), "2, 3", True),
    ("tuple_spacing", boxed("(3,-2)"), "(3, -2)", True),
    ("matrix", boxed("\\begin{pmatrix}1\\\\2\\end{pmatrix}"), "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    # units, percent, degrees, money, thousands, text
    ("percent_sign_dropped", boxed("50"), "50\\%", True),
    ("percent_sign_added", boxed("50\\%"), "50", True),
    ("percent_as_fraction", boxed("0.05"), "5\\%", True),
    ("degrees_circ", boxed("30^\\circ"), "30", True),
    ("degrees_braced_circ", boxed("30"), "30^{\\circ}", True),
    ("degrees_unicode", boxed("90°"), "90", True),
    ("dollars", boxed("\\$10"), "10", True),
    ("units_text", boxed("5\\text{ cm}"), "5", True),
    ("thousands_comma", boxed("1,000"), "1000", True),
    ("thousands_comma_in_gold", boxed("1000000"), "1,000,000", True),
    ("thousands_latex_brace_comma", boxed("1{,}000"), "1000", True),
    ("thousands_comma_not_a_list", boxed("1,100"), "1100", True),  # no space after the comma: one number
    ("thousands_negative_space", boxed("10,\\!000"), "10000", True),  # MATH's spelling
    ("negative_thousands", boxed("-1,100"), "-1100", True),
    ("text_wrapper", boxed("Evelyn"), "\\text{Evelyn}", True),
    ("multiple_choice_letter", boxed("\\text{C}"), "\\text{(C)}", True),
    ("multiple_choice_parens", boxed("(C)"), "C", True),
    # equations and expressions
    ("assignment_vs_value", boxed("x=3"), "3", True),
    ("value_vs_assignment_gold", boxed("3"), "x=3", True),
    ("line_equation_rhs", boxed("2x+1"), "y = 2x+1", True),
    ("expanded_square", boxed("(x+1)^2"), "x^2+2x+1", True),
    ("complex_order", boxed("4i+3"), "3+4i", True),
    ("commuted_sum", boxed("a+b"), "b+a", True),
    # where the box is and how it is written
    ("last_box_wins", "First \\boxed{3}, but wait, recheck: \\boxed{4}.", "4", True),
    ("earlier_box_loses", "First \\boxed{3}, but wait, recheck: \\boxed{4}.", "3", False),
    ("nested_braces", boxed("\\frac{1}{\\sqrt{2}}"), "\\frac{1}{\\sqrt{2}}", True),
    ("fbox", "The answer: \\fbox{7}", "7", True),
    ("boxed_space_form", "Hence \\boxed 5 is the answer.", "5", True),
    ("gold_boxed", boxed("0.5"), "\\boxed{\\frac{1}{2}}", True),
    ("gold_is_a_solution", boxed("5"), "Adding, 2+3=5, so the answer is $\\boxed{5}$.", True),
    ("trailing_full_stop", boxed("\\frac{3}{4}."), "0.75", True),  # math-verify rejects "0.75."
    ("unicode_minus", boxed("−5"), "-5", True),
    ("unicode_pi", boxed("π/2"), "\\frac{\\pi}{2}", True),
    ("unicode_infinity", boxed("∞"), "\\infty", True),
    ("negative_integer", boxed("-5"), "-5", True),
    ("long_text_before_box", "x" * 100_000 + boxed("7"), "7", True),
    # wrong answers
    ("no_box", "The answer is 42.", "42", False),
    ("empty_box", "The answer is \\boxed{}.", "42", False),
    ("truncated_last_box", "First \\boxed{3}, then \\boxed{\\frac{1}{", "3", False),
    ("sign_error", boxed("5"), "-5", False),
    ("sign_error_gold_positive", boxed("-3"), "3", False),
    ("off_by_one", boxed("100"), "99", False),
    ("off_by_one_power", boxed("1025"), "2^{10}", False),
    ("zero_vs_one", boxed("0"), "1", False),
    ("rounded_third", boxed("0.33"), "\\frac{1}{3}", False),
    ("close_but_not_equal", boxed("1.001"), "1", False),
    ("tiny_numbers_differ", boxed("0.0000001"), "0.0000002", False),  # math-verify rounds to 6 decimals
    ("wrong_radical", boxed("3\\sqrt{2}"), "2\\sqrt{3}", False),
    ("wrong_radical_in_fraction", boxed("\\frac{\\sqrt2}{2}"), "\\frac{\\sqrt3}{2}", False),
    ("pi_approximated_to_integer", boxed("3"), "\\pi", False),
    ("wrong_fraction", boxed("\\frac{1}{3}"), "\\frac{1}{2}", False),
    ("interval_endpoint_closed", boxed("[1,2]"), "[1,2)", False),
    ("ordered_pair_swapped", boxed("(2,1)"), "(1,2)", False),
    ("set_missing_element", boxed("\\{1,2\\}"), "\\{1,2,3\\}", False),
    ("set_extra_element", boxed("2, 3, 4"), "2, 3", False),
    ("list_vs_number", boxed("12"), "1,2", False),
    # a comma and a space separate list items, never thousands
    ("list_vs_joined_number", boxed("32, 349"), "32349", False),
    ("two_item_list_vs_thousands", boxed("1, 100"), "1100", False),
    ("list_with_latex_space_vs_number", boxed("1,\\ 100"), "1100", False),
    ("three_item_list_vs_million", boxed("1, 000, 000"), "1000000", False),
    ("set_vs_joined_number", boxed("\\{1, 100\\}"), "1100", False),
    ("list_vs_thousands_gold", boxed("32, 349"), "32,349", False),
    ("thousands_vs_list_gold", boxed("1,100"), "1, 100", False),
    ("wrong_exponent", boxed("x^3"), "x^2", False),
    ("wrong_sign_in_expression", boxed("x^2+1"), "x^2-1", False),
    ("wrong_matrix", boxed("\\begin{pmatrix}1\\\\3\\end{pmatrix}"), "\\begin{pmatrix}1\\\\2\\end{pmatrix}", False),
    ("wrong_assignment", boxed("x=4"), "3", False),
    ("wrong_word", boxed("\\text{Tuesday}"), "\\text{Monday}", False),
    ("prefix_of_word", boxed("Eve"), "\\text{Evelyn}", False),
    ("wrong_letter", boxed("b"), "a", False),
    ("digits_swapped", boxed("21"), "12", False),
    # garbage must be False, never an error
    ("empty_fraction", boxed("\\frac{}{}"), "1", False),
    ("unbalanced_garbage", "\\boxed{}}}{{{", "1", False),
    ("control_characters", boxed("\x00\ufffd"), "1", False),
    ("emoji", boxed("🙂"), "1", False),
    ("backslashes", boxed("\\\\\\\\"), "1", False),
    ("huge_box", "\\boxed{" + "9" * 100_000 + "}", "9", False),
    ("huge_garbage_no_box", "}{\\" * 40_000, "1", False),
    ("empty_gold", boxed("1"), "", False),
]


@pytest.mark.parametrize("completion,gold,expected", [case[1:] for case in GRADER_TABLE],
                         ids=[case[0] for case in GRADER_TABLE])
def test_grade_table(completion, gold, expected):
    assert prompts.grade(completion, gold) is expected


def test_grade_table_is_not_a_string_compare():
    # the table must fail a grader that always says yes, and one that only compares strings
    assert len(GRADER_TABLE) >= 60
    assert sum(not expected for *_, expected in GRADER_TABLE) >= 30
    string_equal_true = [name for name, completion, gold, expected in GRADER_TABLE
                         if expected and prompts.extract_boxed(completion) != gold]
    assert len(string_equal_true) >= 30

# -----------------------------------------------------------------------------
# 2. answer extraction


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\fbox{7}", "7"),
    ("\\boxed{1} and \\fbox{2}", "2"),
    ("\\boxed 5.", "5."),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{}", ""),
    ("\\boxed{3} and a truncated \\boxed{\\frac{1}{", None),
    ("\\boxed{\\frac{1}{2}", None),
    ("no box here", None),
    ("put it in \\boxed{4}, as asked in \\boxed", "4"),
], ids=["nested", "last_wins", "fbox", "fbox_after_boxed", "space_form", "escaped_braces", "empty",
        "unbalanced_last", "unbalanced_only", "no_box", "bare_macro_after_box"])
def test_extract_boxed(text, expected):
    assert prompts.extract_boxed(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("\\boxed1" * 300_000, None),  # every candidate is prose: each one used to copy the rest of the text
    ("\\boxed{" + "\\boxed1" * 300_000 + "}", "\\boxed1" * 300_000),  # ... before the real box at the start
    ("\\boxed{" * 300_000, None),  # every box opens, none closes
    ("\\boxed{" + "{" * 1_000_000 + "}" * 1_000_000 + "}", "{" * 1_000_000 + "}" * 1_000_000),  # deep nesting
], ids=["prose_macros", "prose_macros_inside_a_box", "unclosed_boxes", "deep_nesting"])
def test_extract_boxed_is_linear_on_2mb(text, expected):
    # the quadratic search took 11-19 s on 2 MB on a 2-core test machine (110 s on 1 MB elsewhere); the linear
    # one takes under 0.5 s there. The bound is loose so that a loaded machine does not fail it
    start = time.monotonic()
    assert prompts.extract_boxed(text) == expected
    seconds = time.monotonic() - start
    assert seconds < 2.0

# -----------------------------------------------------------------------------
# 3. the grader's guarantees: bounded time, replies in step with requests, threads, daemonic pools, any input


def test_grade_slow_input_times_out():
    # sympy cannot be interrupted here; only killing the worker bounds it
    start = time.monotonic()
    assert prompts.grade(boxed("5^{5^{5^{5^5}}}"), "1", timeout=2) is False
    assert time.monotonic() - start < 2 + 3
    assert prompts.grade(boxed("\\frac12"), "0.5") is True  # a fresh worker takes over


def test_grade_from_a_thread():
    # inputs seen nowhere else in this file, so the worker answers them, not the cache
    pairs = [(boxed(f"\\frac{{{i}}}{{{2 * i}}}"), "0.5") for i in range(3, 7)] + [(boxed("\\frac{3}{7}"), "0.5")]
    results = [None] * len(pairs)

    def grade_one(i):
        results[i] = prompts.grade(*pairs[i])
    threads = [threading.Thread(target=grade_one, args=(i,)) for i in range(len(pairs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True, True, True, True, False]


def assert_grades_in_step(monkeypatch):
    # pairs with known, differing answers: a grader reading the reply of another request gets one wrong
    monkeypatch.setattr(prompts, "_cache", {})  # the worker must answer them, not the cache
    assert prompts.grade(boxed("a+b"), "a-b") is False
    assert prompts.grade(boxed("a+b"), "b+a") is True
    assert prompts.grade(boxed("\\sqrt{18}"), "3\\sqrt{2}") is True
    assert prompts.grade(boxed("\\sqrt{18}"), "2\\sqrt{3}") is False
    assert prompts.grade(boxed("(p+q)^2"), "p^2+2pq+q^2") is True


def test_grade_after_an_interrupted_call_answers_the_right_question(monkeypatch):
    assert prompts.grade(boxed("\\frac{6}{8}"), "\\frac34") is True  # the worker is up
    real_read_line = prompts._read_line

    def interrupted(process, seconds):
        monkeypatch.setattr(prompts, "_read_line", real_read_line)  # once
        raise KeyboardInterrupt  # as if ^C came while the worker was grading: its reply is still on the way
    monkeypatch.setattr(prompts, "_read_line", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prompts.grade(boxed("y\\cdot y"), "y^2")  # a True answer, so a stale reply would make the next one True
    assert_grades_in_step(monkeypatch)


def test_grade_rejects_a_bad_timeout_before_asking_the_worker(monkeypatch):
    for timeout in (None, 0, -1.0, float("nan"), float("inf"), "5"):
        with pytest.raises(ValueError, match="timeout"):
            prompts.grade(boxed("z\\cdot z"), "z^2", timeout=timeout)
    assert_grades_in_step(monkeypatch)


def test_grade_never_takes_a_reply_that_is_not_a_verdict(monkeypatch):
    assert prompts.grade(boxed("\\frac{10}{8}"), "\\frac54") is True  # the worker is up
    monkeypatch.setattr(prompts, "_read_line", lambda process, seconds: b"999999 1\n")  # garbage on the pipe
    assert prompts.grade(boxed("v\\cdot v"), "v^3") is False  # no verdict: not graded right, and the worker is replaced
    assert prompts._worker is None
    monkeypatch.undo()
    assert_grades_in_step(monkeypatch)


def grading_process(tmp_path):
    """A process busy grading a pathological answer, and its math-verify worker (pid), deep in sympy."""
    script = tmp_path / "grading.py"
    script.write_text("import prompts, sys\nprompts.grade('\\\\boxed{5^{5^{5^{5^5}}}}', '1', timeout=600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], cwd=HERE, env={**os.environ, "PYTHONPATH": HERE})
    deadline, worker = time.monotonic() + 60, None
    while worker is None and time.monotonic() < deadline:
        children = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
        worker = int(children[0]) if children else None
        time.sleep(0.2)
    assert worker, "no grader worker started"
    time.sleep(3)  # the worker is deep in sympy now
    return parent, worker


def running(pid):
    """Alive and not a zombie (a dead worker nobody reaped yet is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def dies_within(pid, seconds):
    """Whether `pid` stops running within `seconds`; killed here if not, so a failing test leaves nothing behind."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and running(pid):
        time.sleep(0.1)
    alive = running(pid)
    if alive:
        os.kill(pid, 9)
    return not alive


def test_the_grader_worker_dies_with_its_parent_even_while_it_computes(tmp_path):
    """kill -9 of a process that is grading: its math-verify worker, busy in sympy and not reading its pipe, must not
    live on (it used to spin at 99% CPU)."""
    parent, worker = grading_process(tmp_path)
    parent.kill()
    parent.wait()
    assert dies_within(worker, 10)


def test_the_grader_worker_dies_with_its_parent_while_the_parent_is_an_unreaped_zombie(tmp_path):
    """A killed parent that its own parent has not reaped yet is a zombie: the pid still answers os.kill(pid, 0), and
    the worker used to compute on (23 s at 100% CPU in a trial). Here this test is that grandparent: it reaps the
    killed process only after the worker is gone."""
    parent, worker = grading_process(tmp_path)
    parent.kill()
    try:
        time.sleep(0.5)
        assert not running(parent.pid) and os.path.exists(f"/proc/{parent.pid}")  # a zombie, not yet reaped
        assert dies_within(worker, 10)
    finally:
        parent.wait()


def test_a_process_is_gone_once_it_exits_even_before_it_is_reaped(monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not prompts._gone(child.pid)
        child.kill()
        time.sleep(0.5)
        assert prompts._gone(child.pid)  # a zombie: its pid still answers os.kill(pid, 0)
        monkeypatch.setattr(os.path, "isdir", lambda path: False)  # no /proc (macOS): os.kill is all there is
        assert not prompts._gone(child.pid)  # it cannot tell a zombie from a live process
        assert not prompts._gone(os.getpid())
    finally:
        child.wait()
    assert prompts._gone(child.pid)  # reaped: os.kill fails too
    monkeypatch.undo()
    assert prompts._gone(child.pid)


def test_plain_numbers_compare_exactly_not_as_floats():
    assert prompts.grade(boxed("9007199254740993"), "9007199254740992") is False  # equal as floats (2^53 + 1)
    assert prompts.grade(boxed("0.10000000000000000001"), "0.1") is False
    assert prompts.grade(boxed("9007199254740993"), "9007199254740993") is True
    assert prompts.grade(boxed("12.50"), "12.5") is True


def test_grade_timeout_is_not_cached_as_an_answer():
    # a fresh polynomial identity: expanding takes math-verify ~0.3 s, so 10 ms runs out, 60 s does not
    expanded = "+".join(f"{math.comb(20, k)}w^{{{k}}}" for k in range(20, -1, -1))
    assert prompts.grade(boxed(expanded), "(w+1)^{20}", timeout=0.01) is False
    assert prompts.grade(boxed(expanded), "(w+1)^{20}", timeout=60) is True


def _grade_pair(pair):
    return prompts.grade(*pair)


def test_grade_in_daemonic_pool_worker():
    prompts.grade(boxed("\\sqrt{8}"), "3")  # a worker in the parent must not leak into forked children
    pairs = [(boxed("\\sqrt{8}"), "2\\sqrt{2}"), (boxed("\\sqrt{8}"), "3\\sqrt{2}"), (boxed("0.25"), "\\frac{1}{4}")]
    with multiprocessing.get_context("fork").Pool(2) as pool:  # pool workers are daemonic
        assert pool.map(_grade_pair, pairs) == [True, False, True]
    assert prompts.grade(boxed("\\sqrt{8}"), "2\\sqrt{2}") is True


@pytest.mark.parametrize("completion,gold", [
    (None, "1"), ("\\boxed{1}", None), (b"\\boxed{1}", "1"), (1, 1), (["\\boxed{1}"], "1"),
    ("\\boxed{1}", b"1"), ("\\boxed{\ud800x}", "2"), ("\\boxed{x}", "\\boxed{\\frac{1}{"),
], ids=["none_completion", "none_gold", "bytes_completion", "ints", "list", "bytes_gold", "lone_surrogate",
        "truncated_gold"])
def test_grade_odd_input_is_false(completion, gold):
    # non-str input is a caller's bug, but a reward function must not crash a training run over it
    assert prompts.grade(completion, gold) is False


def test_import_is_light():
    code = "import prompts, sys; print(sorted(set(sys.modules) & {'torch', 'transformers', 'vllm', 'datasets'}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

# -----------------------------------------------------------------------------
# 4. data loading, from small local files shaped like the real sets


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_load_records_aime_shape(tmp_path):
    path = str(tmp_path / "aime24.jsonl")
    write_jsonl(path, [{"id": 60, "problem": "Find x.", "solution": "x is \\boxed{204}", "answer": "204", "url": "u"},
                       {"id": 61, "problem": "Find y.", "solution": None, "answer": 25}])
    assert prompts.load_records(path) == [
        {"id": 0, "problem": "Find x.", "solution": "x is \\boxed{204}", "answer": "204", "reference": None},
        {"id": 1, "problem": "Find y.", "solution": None, "answer": "25", "reference": None}]


def test_load_records_keeps_a_reference_column_for_teacher_format_sft(tmp_path):
    path = str(tmp_path / "warm.jsonl")
    write_jsonl(path, [{"problem": "P", "solution": "S \\boxed{1}", "reference": "R"},
                       {"problem": "Q", "solution": "\\boxed{2}"}])
    assert [r["reference"] for r in prompts.load_records(path)] == ["R", None]


def test_load_records_opsd_train_shape_takes_answer_from_solution(tmp_path):
    path = str(tmp_path / "train.jsonl")
    write_jsonl(path, [{"problem": "What is 2+3?", "solution": "2+3=5, so \\boxed{5}."},
                       {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$"}])
    records = prompts.load_records(path, require=("problem", "solution", "answer"))
    assert [r["answer"] for r in records] == ["5", "\\frac{1}{2}"]


def test_load_records_amobench_shape_drops_description_rows(tmp_path, capsys):
    path = str(tmp_path / "amo.parquet")
    import pyarrow
    import pyarrow.parquet
    rows = [{"question_id": 1, "prompt": "P1", "answer": "\\frac{1}{2}", "answer_type": "number"},
            {"question_id": 2, "prompt": "P2", "answer": "All n such that ...", "answer_type": "description"},
            {"question_id": 3, "prompt": "P3", "answer": "x^2+1", "answer_type": "variable"}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    records = prompts.load_records(path)
    assert [(r["id"], r["problem"], r["answer"]) for r in records] == [(0, "P1", "\\frac{1}{2}"), (2, "P3", "x^2+1")]
    assert "dropped 1" in capsys.readouterr().out


def test_load_records_openthoughts_shape_and_limit(tmp_path):
    path = str(tmp_path / "ot.json")
    with open(path, "w") as f:
        json.dump([{"Question": f"Q{i}", "Answer": str(i)} for i in range(5)], f)
    records = prompts.load_records(path, limit=2)
    assert [(r["problem"], r["answer"], r["solution"]) for r in records] == [("Q0", "0", None), ("Q1", "1", None)]


def test_load_records_json_lines_in_a_json_file(tmp_path):
    path = str(tmp_path / "rows.json")  # datasets' to_json writes one object per line
    write_jsonl(path, [{"question": "Q", "answer": "1"}])
    assert prompts.load_records(path)[0]["problem"] == "Q"


def test_load_records_missing_answer_names_row_and_field(tmp_path):
    path = str(tmp_path / "bad.jsonl")
    write_jsonl(path, [{"problem": "ok", "answer": "1"}, {"problem": "no answer", "solution": "no box"}])
    with pytest.raises(ValueError, match=r"row 1 .*'answer'") as error:
        prompts.load_records(path)
    assert path in str(error.value)


def test_load_records_bad_json_names_the_line(tmp_path):
    path = str(tmp_path / "broken.jsonl")
    with open(path, "w") as f:
        f.write('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": \n')
    with pytest.raises(ValueError, match="line 3"):
        prompts.load_records(path)


def test_load_records_missing_file():
    with pytest.raises(prompts.UserError, match="no such data file 'nope.jsonl'"):
        prompts.load_records("nope.jsonl")


def test_load_records_rejects_an_unsupported_file_format_instead_of_asking_the_hub(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("problem,answer\nWhat is 1+1?,2\n")
    message = r"x\.csv: unsupported data file format; use one of \.jsonl, \.json, \.parquet"
    with pytest.raises(prompts.UserError, match=message):
        prompts.load_records(str(path))


def test_load_records_says_a_present_column_is_empty_rather_than_missing(tmp_path):
    path = str(tmp_path / "empty_solution.jsonl")
    write_jsonl(path, [{"problem": "P", "solution": "S \\boxed{1}"}, {"problem": "Q", "solution": "   "}])
    with pytest.raises(prompts.UserError, match=r"row 1 has no solution: its 'solution' is empty$"):
        prompts.load_records(path, require=("problem", "solution"))


def test_load_records_of_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(prompts.UserError, match="empty.jsonl: no records"):
        prompts.load_records(str(path))


def test_read_jsonl_leaves_out_a_torn_last_line_only_when_asked(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    rows, complete = prompts.read_jsonl(str(path), torn_tail_ok=True)
    assert rows == [{"step": 1}, {"step": 2}] and complete == len(b'{"step": 1}\n{"step": 2}\n')
    with pytest.raises(prompts.UserError, match="log.jsonl: line 3 is not valid JSON"):
        prompts.read_jsonl(str(path))


def test_read_jsonl_names_the_file_and_line_of_invalid_utf8(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n')  # Latin-1, not UTF-8
    with pytest.raises(prompts.UserError, match=r"rows\.jsonl: line 2 is not UTF-8"):
        prompts.read_jsonl(str(path))
    with pytest.raises(prompts.UserError, match=r"rows\.jsonl: line 2 is not UTF-8"):
        prompts.load_records(str(path))


@pytest.mark.parametrize("layout", ["array", "lines"])
def test_a_json_file_with_invalid_utf8_names_the_file_and_line(tmp_path, layout):
    path = tmp_path / "rows.json"
    rows = [b'{"problem": "a", "answer": "1"}', b'{"problem": "b", "answer": "2"}',
            b'{"problem": "caf\xe9", "answer": "3"}']
    if layout == "array":  # a JSON array, one row a line after the "["
        path.write_bytes(b"[\n" + b",\n".join(rows) + b"\n]\n")
        line = 4
    else:  # datasets' to_json: one object a line
        path.write_bytes(b"\n".join(rows) + b"\n")
        line = 3
    with pytest.raises(prompts.UserError, match=rf"rows\.json: line {line} is not UTF-8"):
        prompts.load_records(str(path))

# -----------------------------------------------------------------------------
# 5. prompt token ids, with the toy Qwen3-style tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(toy.build_tokenizer(str(tmp_path_factory.mktemp("tokenizer"))))


def test_messages_put_the_privileged_context_before_the_instruction():
    record = {"problem": "What is 2+3?", "solution": "2+3=5, \\boxed{5}", "answer": "5"}
    student = prompts.student_messages("What is 2+3?")[0]["content"]
    teacher = prompts.teacher_messages(record)[0]["content"]
    assert student == "What is 2+3?\n\n" + prompts.INSTRUCTION
    assert teacher.startswith("What is 2+3?\n\nHere is a reference solution:\n2+3=5, \\boxed{5}")
    assert teacher.endswith(prompts.TEACHER_CONTEXTS["solution"][1] + "\n\n" + prompts.INSTRUCTION)
    # answer-only context: the final answer, and not a word of the solution
    answer_only = prompts.teacher_messages(record, "answer")[0]["content"]
    assert answer_only.startswith("What is 2+3?\n\nThe final answer is 5.")
    assert "2+3=5" not in answer_only
    assert answer_only.endswith(prompts.TEACHER_CONTEXTS["answer"][1] + "\n\n" + prompts.INSTRUCTION)


@pytest.mark.parametrize("context", ["solution", "answer"])
@pytest.mark.parametrize("thinking,prefix", [(False, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
                                             (True, "<|im_start|>assistant\n")], ids=["thinking_off", "thinking_on"])
def test_student_and_teacher_prompts_end_with_the_same_assistant_prefix(tokenizer, thinking, prefix, context):
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    student = prompts.student_prompt_ids(tokenizer, "What is 123*4?", thinking)
    record = {"problem": "What is 123*4?", "solution": "123*4 = 492\n\\boxed{492}", "answer": "492"}
    teacher = prompts.teacher_prompt_ids(tokenizer, record, thinking, context)
    assert all(isinstance(i, int) for i in student + teacher)
    assert student[-len(prefix_ids):] == teacher[-len(prefix_ids):] == prefix_ids
    assert tokenizer.decode(student).endswith(prompts.INSTRUCTION + "<|im_end|>\n" + prefix)
    assert len(teacher) > len(student)


QWEN3_TEMPLATE = "trl/chat_templates/qwen3.jinja"  # Qwen3's own chat template, as TRL ships it (.ci/run installs trl)


@pytest.fixture(scope="module")
def qwen3(tokenizer):
    """The toy tokenizer (Qwen3's special tokens) rendering with the real Qwen3 chat template."""
    import copy
    import importlib.util
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed: it carries the real Qwen3 chat template (.ci/run installs it)")
    qwen3 = copy.deepcopy(tokenizer)
    qwen3.chat_template = open(os.path.join(os.path.dirname(spec.origin), QWEN3_TEMPLATE[4:])).read()
    return qwen3


@pytest.mark.parametrize("student", [False, True], ids=["student_off", "student_on"])
@pytest.mark.parametrize("teacher", [False, True], ids=["teacher_off", "teacher_on"])
def test_with_the_real_qwen3_template_the_teacher_prompt_ends_with_the_students_prefix(qwen3, student, teacher):
    """Every combination of --thinking and --teacher-thinking: the rollout is appended where the student wrote it. With
    Qwen3's template thinking off adds an empty think block to the generation prompt and changes nothing else."""
    record = {"problem": "What is 123*4?", "solution": "123*4 = 492\n\\boxed{492}", "answer": "492"}
    student_ids = prompts.student_prompt_ids(qwen3, record["problem"], student)
    teacher_ids = prompts.teacher_prompt_ids(qwen3, record, teacher, "solution", student)
    prefix = "<|im_start|>assistant\n" + ("" if student else "<think>\n\n</think>\n\n")
    assert qwen3.decode(student_ids).endswith(prompts.INSTRUCTION + "<|im_end|>\n" + prefix)
    assert qwen3.decode(teacher_ids).endswith(prompts.INSTRUCTION + "<|im_end|>\n" + prefix)
    assert "Here is a reference solution" in qwen3.decode(teacher_ids)
    unaligned = prompts.chat_prompt_ids(qwen3, prompts.teacher_messages(record), teacher)  # the official code's prompt
    assert (unaligned == teacher_ids) == (student == teacher)


def test_rollout_starts_exactly_after_the_prompt(tokenizer):
    prompt = prompts.student_prompt_ids(tokenizer, "What is 123*4?")
    rollout = prompts.completion_ids(tokenizer, "3*4+0=12\n\\boxed{492}")
    sequence = prompt + rollout  # ids are concatenated, never re-tokenised
    assert sequence[len(prompt):] == rollout
    assert tokenizer.decode(sequence[len(prompt):], skip_special_tokens=True) == "3*4+0=12\n\\boxed{492}"


def test_completion_ids_end_with_im_end(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert prompts.stop_token_ids(tokenizer)[0] == im_end
    assert len(set(prompts.stop_token_ids(tokenizer))) == len(prompts.stop_token_ids(tokenizer))
    assert prompts.completion_ids(tokenizer, "\\boxed{5}")[-1] == im_end

"""show_rollouts.py: the page shows every token escaped and in order, coloured by divergence, with a step filter."""
import html
import json
import os
import re
import subprocess
import sys

import pytest

import show_rollouts
from prompts import UserError

TRICKY = ["<script>", "alert(1)", "</script>", " & ", "\n", "", "é→∑ 中", "\\boxed{42}", "  two  spaces",
          "\"q'", "\n\n", "&amp;", "\t"]


def make_row(step, problem_id, tokens, divergences, correct=True):
    return {"step": step, "problem_id": problem_id, "rollout": "".join(tokens), "correct": correct,
            "length": len(tokens), "divergence": sum(divergences) / len(divergences), "tokens": tokens,
            "token_divergence": divergences}


def write_rows(path, rows, tail=""):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.write(tail)


def render(out_dir):
    show_rollouts.main([str(out_dir)])
    with open(os.path.join(out_dir, "rollouts.html"), encoding="utf-8") as f:
        return f.read()


def sections(page):
    """[(step, header, [(level, title, text), ...]), ...] in page order."""
    found = []
    for step, header, body in re.findall(r'<section data-step="([^"]*)"><h2>(.*?)</h2><pre>(.*?)</pre></section>',
                                         page, re.S):
        spans = re.findall(r'<span class="c(\d+)" title="([^"]*)">(.*?)</span>', body, re.S)
        tokens = [(int(level), html.unescape(title), html.unescape(text.replace('<i class="nl"></i>', "")))
                  for level, title, text in spans]
        found.append((html.unescape(step), html.unescape(re.sub(r"<[^>]+>", "", header)), tokens))
    return found


def test_every_token_is_shown_escaped_and_in_order(tmp_path):
    divergences = [0.01 * (i + 1) for i in range(len(TRICKY))]
    write_rows(tmp_path / "rollouts.jsonl", [make_row(10, 3, TRICKY, divergences)])
    page = render(tmp_path)
    [(_, _, tokens)] = sections(page)
    assert [text for _, _, text in tokens] == TRICKY
    assert page.count("<script>") == 1  # the page's own filter; the token is &lt;script&gt;
    assert ">&lt;script&gt;</span>" in page
    assert "&amp;amp;" in page  # the token "&amp;" shows as typed, not as "&"


def test_newlines_stay_newlines_with_a_visible_mark(tmp_path):
    write_rows(tmp_path / "rollouts.jsonl", [make_row(10, 3, ["7*6+0=42", "\n", "3*6"], [0.01, 2.0, 0.01])])
    page = render(tmp_path)
    assert "white-space: pre-wrap" in page
    assert '<i class="nl"></i>\n</span>' in page  # the mark inside the coloured span, then the real newline


def test_colour_grows_with_divergence(tmp_path):
    divergences = [0.01] * 200 + [0.001 * 2 ** i for i in range(13)] + [-0.002]
    tokens = [f"t{i}" for i in range(len(divergences))]
    write_rows(tmp_path / "rollouts.jsonl", [make_row(10, 0, tokens, divergences)])
    [(_, _, shown)] = sections(render(tmp_path))
    levels = [level for _, level in sorted(zip(divergences, [level for level, _, _ in shown]))]
    assert levels == sorted(levels)
    assert levels[0] == 0 and levels[-1] == show_rollouts.LEVELS
    assert len(set(levels)) >= 6  # the decades between the median and the top are told apart


def test_one_huge_value_does_not_wash_out_the_rest(tmp_path):
    divergences = [0.01] * 2000 + [1.0] * 10 + [1e6]
    tokens = [f"t{i}" for i in range(len(divergences))]
    write_rows(tmp_path / "rollouts.jsonl", [make_row(10, 0, tokens, divergences)])
    [(_, _, shown)] = sections(render(tmp_path))
    assert {level for level, _, _ in shown[2000:2010]} == {show_rollouts.LEVELS}
    assert {level for level, _, _ in shown[:2000]} == {0}


def test_title_holds_the_exact_value(tmp_path):
    divergences = [0.0123456789012345, 5.25, -0.003, 0.0, 1e-7, 123456.75]
    write_rows(tmp_path / "rollouts.jsonl", [make_row(10, 0, list("abcdef"), divergences)])
    [(_, _, shown)] = sections(render(tmp_path))
    assert [float(title) for _, title, _ in shown] == divergences
    assert shown[2][0] == 0  # a slightly negative value is white


def test_one_section_per_rollout_with_step_problem_grade_length_and_mean(tmp_path):
    rows = [make_row(10, 7, ["a", "b"], [0.5, 1.5], correct=True),
            make_row(10, 8, ["c", "d", "e"], [0.25, 0.25, 0.25], correct=False),
            make_row(20, 7, ["f"], [0.125])]
    write_rows(tmp_path / "rollouts.jsonl", rows)
    found = sections(render(tmp_path))
    assert [header for _, header, _ in found] == [
        "step 10 · problem 7 · correct · 2 tokens · mean divergence 1",
        "step 10 · problem 8 · wrong · 3 tokens · mean divergence 0.25",
        "step 20 · problem 7 · correct · 1 tokens · mean divergence 0.125"]


def test_step_filter_lists_exactly_the_steps_present(tmp_path):
    write_rows(tmp_path / "rollouts.jsonl", [make_row(step, 0, ["x"], [0.1]) for step in (20, 10, 30, 10)])
    page = render(tmp_path)
    select = re.search(r'<select id="step">(.*?)</select>', page, re.S).group(1)
    assert re.findall(r'<option value="([^"]*)">', select) == ["all", "10", "20", "30"]
    assert [step for step, _, _ in sections(page)] == ["10", "10", "20", "30"]


def test_rank_files_are_merged_in_step_order_and_named(tmp_path):
    for rank in (0, 1):
        write_rows(tmp_path / f"rollouts.rank{rank}.jsonl",
                   [make_row(step, rank, [f"r{rank}s{step}"], [0.1]) for step in (10, 20)])
    found = sections(render(tmp_path))
    assert [tokens[0][2] for _, _, tokens in found] == ["r0s10", "r1s10", "r0s20", "r1s20"]
    assert "rollouts.rank1.jsonl" in found[1][1]


def test_torn_last_line_is_left_out(tmp_path):
    torn = json.dumps(make_row(20, 1, ["late"], [0.1]))[:40]
    write_rows(tmp_path / "rollouts.jsonl", [make_row(10, 0, ["early"], [0.1])], tail=torn)
    found = sections(render(tmp_path))
    assert [tokens[0][2] for _, _, tokens in found] == ["early"]


def test_old_format_is_a_one_line_error_naming_the_file(tmp_path):
    old = {"step": 10, "problem_id": 0, "rollout": "x", "correct": True, "length": 1, "divergence": 0.1,
           "top_tokens": [["x", 0.1]]}
    write_rows(tmp_path / "rollouts.jsonl", [old])
    result = subprocess.run([sys.executable, "show_rollouts.py", str(tmp_path)], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "top_tokens" in result.stderr
    assert str(tmp_path / "rollouts.jsonl") in result.stderr


def test_old_rows_beside_new_ones_are_named_on_the_page(tmp_path):
    old = {"step": 10, "problem_id": 0, "rollout": "x", "correct": True, "length": 1, "divergence": 0.1,
           "top_tokens": [["x", 0.1]]}
    write_rows(tmp_path / "rollouts.jsonl", [old, make_row(20, 0, ["new"], [0.1])])
    page = render(tmp_path)
    assert [step for step, _, _ in sections(page)] == ["20"]
    assert re.search(r"rollouts\.jsonl: 1 of 2 rows come from an older opsd\.py", page)


def test_missing_dir_or_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        show_rollouts.main([str(tmp_path / "nope")])
    with pytest.raises(UserError, match="no rollouts"):
        show_rollouts.main([str(tmp_path)])


def test_page_has_no_external_reference(tmp_path):
    write_rows(tmp_path / "rollouts.jsonl", [make_row(10, 0, TRICKY, [0.1] * len(TRICKY))])
    page = render(tmp_path)
    for external in ("http", "<link", "src=", "@import", "url("):
        assert external not in page


def test_output_option_chooses_the_path(tmp_path):
    write_rows(tmp_path / "rollouts.jsonl", [make_row(10, 0, ["x"], [0.1])])
    show_rollouts.main([str(tmp_path), "--output", str(tmp_path / "page.html")])
    assert os.path.exists(tmp_path / "page.html") and not os.path.exists(tmp_path / "rollouts.html")


def test_an_output_in_a_directory_not_there_yet_is_written(tmp_path):
    write_rows(tmp_path / "rollouts.jsonl", [make_row(10, 0, ["a", "b"], [0.1, 0.2])])
    show_rollouts.main([str(tmp_path), "--output", str(tmp_path / "pages" / "new" / "page.html")])
    assert "<!doctype html>" in (tmp_path / "pages" / "new" / "page.html").read_text()

"""
A page that shows where the teacher disagreed with the student: every rollout that a training run saved
(OUT/rollouts.jsonl, or OUT/rollouts.rank<R>.jsonl under torchrun), token by token, each token's background
coloured by its divergence, the exact value in its tooltip, with a filter by step.

The colour is a log scale over all the tokens on the page: white at or below the median divergence, full red at or
above the 99.9th percentile. Most tokens of a rollout score ~0.01 and a few ~5, so a linear scale would show only
the few, and a scale set by the maximum would let one huge value wash out the rest. The run may still be appending:
a torn last line is left out. Rows from an older opsd.py (only top_tokens) are left out with a line on the page.

  python show_rollouts.py runs/opsd                          # writes runs/opsd/rollouts.html
  python show_rollouts.py runs/opsd --output /tmp/page.html
"""
import argparse
import glob
import html
import math
import os

import plumbing
import prompts
from prompts import UserError

LEVELS = 10  # colour steps above white: enough to read an order, few enough to tell apart


def get_parser():
    parser = argparse.ArgumentParser(description="An HTML page of a run's saved rollouts, coloured by divergence.")
    parser.add_argument("out_dir", help="the run's out dir, holding rollouts.jsonl or rollouts.rank<R>.jsonl")
    parser.add_argument("--output", default=None, help="the page to write (default: OUT_DIR/rollouts.html)")
    return parser


# 1. read the rows of every rank's file; rows without per-token values are counted, not shown
def read_rollouts(out_dir):
    if not os.path.isdir(out_dir):
        raise UserError(f"no such directory {out_dir!r}")
    paths = sorted(glob.glob(os.path.join(out_dir, "rollouts*.jsonl")))
    if not paths:
        raise UserError(f"{out_dir}: no rollouts*.jsonl (opsd.py writes them every --save-rollouts-every steps)")
    rollouts, notes = [], []
    for path in paths:
        rows, _ = prompts.read_jsonl(path, torn_tail_ok=True)
        old = [row for row in rows if "token_divergence" not in row]
        if old:
            notes.append(f"{path}: {len(old)} of {len(rows)} rows come from an older opsd.py (top_tokens only) "
                         "and have no per-token divergence: not shown")
        for number, row in enumerate(rows, start=1):
            if "token_divergence" not in row:
                continue
            if len(row["tokens"]) != len(row["token_divergence"]):
                raise UserError(f"{path}: row {number} has {len(row['tokens'])} tokens but "
                                f"{len(row['token_divergence'])} token_divergence values")
            rollouts.append((row["step"], os.path.basename(path), row))
    if not rollouts:
        raise UserError(" ; ".join(notes) or f"{out_dir}: the rollouts files hold no complete row yet")
    rollouts.sort(key=lambda rollout: rollout[0])  # stable: within a step, in file order
    return rollouts, notes, len(paths) > 1


# 2. the colour scale: log10 from the median (white) to the 99.9th percentile (full colour)
def colour_scale(rollouts):
    values = sorted(d for _, _, row in rollouts for d in row["token_divergence"] if math.isfinite(d))
    high = values[int(0.999 * (len(values) - 1))] if values else 0.0
    if high <= 0:
        return 1.0, 1.0  # nothing to show: every token white
    low = max(values[len(values) // 2], high / 1e4)  # at most 4 decades: below them nothing is worth a colour
    return low, high


def level(d, low, high):
    if math.isnan(d):
        return LEVELS  # a bug upstream: let it stand out
    if d <= low:
        return 0
    if d >= high:
        return LEVELS
    return round(LEVELS * math.log(d / low) / math.log(high / low))


def token_html(token, d, low, high):
    # a newline stays a newline (pre-wrap) and gets a grey mark before it, so a coloured "\n" can be seen
    text = html.escape(token).replace("\n", '<i class="nl"></i>\n')
    return f'<span class="c{level(d, low, high)}" title="{html.escape(repr(d))}">{text}</span>'


# 3. the page: one section per rollout, a step filter of a few lines of JS, no external file
STYLE = """body { font-family: sans-serif; margin: 1.5em; }
pre { white-space: pre-wrap; font-size: 14px; line-height: 1.5; margin: 0.3em 0 1.2em; }
pre span:empty { display: inline-block; width: 0.4em; height: 1em; outline: 1px dotted #bbb; }
.nl::before { content: "\\21B5"; color: #999; }
h2 { font-size: 14px; margin: 0; padding: 0.3em; background: #eee; }
.correct { color: #070; } .wrong { color: #b00; } .legend span { padding: 0 0.4em; border: 1px solid #ddd; }
"""
SCRIPT = """const select = document.getElementById("step");
function show() {
  for (const section of document.querySelectorAll("section")) {
    section.hidden = select.value !== "all" && section.dataset.step !== select.value;
  }
}
select.onchange = () => { location.hash = "step=" + select.value; show(); };
const chosen = location.hash.match(/^#step=(.+)$/);  // a link (or a reload) keeps its step
if (chosen) { select.value = decodeURIComponent(chosen[1]); }
if (select.value === "") { select.value = "all"; }  // a step not on this page
show();
"""


def page(out_dir, rollouts, notes, several_files):
    low, high = colour_scale(rollouts)
    # white to red at fixed hue and saturation: the lightness alone says how strongly the teacher disagreed
    levels = "\n".join(f".c{i} {{ background: hsl(0 90% {100 - 4 * i}%); }}" for i in range(LEVELS + 1))
    bounds = [f"{low * (high / low) ** (i / LEVELS):.3g}" for i in range(LEVELS + 1)]
    bounds[0], bounds[-1] = f"&le; {bounds[0]}", f"&ge; {bounds[-1]}"
    swatches = " ".join(f'<span class="c{i}">{bound}</span>' for i, bound in enumerate(bounds))
    steps = sorted({step for step, _, _ in rollouts})
    options = "".join(f'<option value="{html.escape(str(s))}">{html.escape(str(s))}</option>' for s in steps)
    parts = [f'<!doctype html>\n<html><head><meta charset="utf-8"><title>rollouts of {html.escape(out_dir)}</title>',
             f"<style>\n{STYLE}{levels}\n</style></head><body>",
             f"<h1>Rollouts of {html.escape(out_dir)}</h1>",
             f"<p>{len(rollouts)} rollouts, steps {html.escape(', '.join(map(str, steps)))}.</p>"]
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    parts.append(f'<p class="legend">Token background, log scale from the median divergence (white) to the 99.9th '
                 f'percentile (full red) of the page\'s tokens; hover a token for its value: {swatches}</p>')
    parts.append(f'<p><label>step <select id="step"><option value="all">all</option>{options}</select></label></p>')
    for step, file_name, row in rollouts:
        grade = '<b class="correct">correct</b>' if row["correct"] else '<b class="wrong">wrong</b>'
        header = [f"step {html.escape(str(step))}", f"problem {html.escape(str(row['problem_id']))}"]
        header += [html.escape(file_name)] if several_files else []
        header += [grade, f"{html.escape(str(row['length']))} tokens", f"mean divergence {row['divergence']:.4g}"]
        tokens = "".join(token_html(t, d, low, high) for t, d in zip(row["tokens"], row["token_divergence"]))
        parts.append(f'<section data-step="{html.escape(str(step))}"><h2>{" · ".join(header)}</h2>'
                     f"<pre>{tokens}</pre></section>")
    parts.append(f"<script>\n{SCRIPT}</script>\n</body></html>\n")
    return "\n".join(parts)


def main(argv=None):
    args = get_parser().parse_args(argv)
    rollouts, notes, several_files = read_rollouts(args.out_dir)
    output = args.output or os.path.join(args.out_dir, "rollouts.html")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.write(page(args.out_dir, rollouts, notes, several_files))
    for note in notes:
        print(note)
    print(f"wrote {output}: {len(rollouts)} rollouts")


if __name__ == "__main__":
    plumbing.run_script(main)

"""Prompts, data and the answer grader shared by every script (OPSD, GRPO, SFT, eval).

1. templates: the student sees the problem; the teacher (the same model) also sees privileged context, the
   reference solution or only its final answer. Both end with the same instruction, so the two prompts end in
   the same assistant prefix.
2. token ids: prompts are tokenised once, here, and rollouts are appended as ids (never re-tokenised).
3. data: `load_records` maps a benchmark key, a local .jsonl/.json/.parquet file or a Hugging Face id
   to rows {"id", "problem", "solution", "answer"}; `UserError` is the error for a bad option, file or record.
4. answer extraction: the last \\boxed{...} (or \\fbox{...}) of a completion.
5. grader: `grade(completion, gold)` is math-verify (gold first, prediction parsed LaTeX-only) or'ed with
   a normalised string compare. math-verify runs in a persistent worker subprocess: that is the only way
   to bound sympy work it cannot interrupt, and its SIGALRM timeouts fail outside the main thread.

Departures: the teacher prompt follows the official OPSD wording in spirit, not verbatim.
`python prompts.py --grader-worker` is the worker; nobody runs it by hand.
Importing this file imports only the standard library (datasets/pyarrow/math-verify are imported lazily).
"""
import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from decimal import Decimal

# -----------------------------------------------------------------------------
# 1. prompt templates

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# what the teacher sees beside the problem (the paper: privileged information "such as the ground-truth answer
# or a reference chain-of-thought"), and the transition that asks it to solve the problem itself
TEACHER_CONTEXTS = {
    "solution": ("Here is a reference solution:\n{solution}",
                 "After understanding the reference solution, please try to solve this problem on your own: "
                 "reason it through in your own words, without copying the reference solution."),
    "answer": ("The final answer is {answer}.",
               "Knowing the final answer, please try to solve this problem on your own: "
               "reason it through step by step."),
}
# the controls (opsd.py --teacher-context): "other", the reference solution of *another* problem of the data set, in
# the words of "solution" (opsd.py draws it; OP2SD, arXiv 2608.09228); "none", no context at all: the teacher's prompt
# is the student's (reference-free self-distillation, arXiv 2609.20612; with --teacher-model, plain on-policy
# distillation)
CONTROLS = ("other", "none")


def student_messages(problem: str) -> list[dict]:
    return [{"role": "user", "content": f"{problem}\n\n{INSTRUCTION}"}]


def teacher_messages(record: dict, context: str = "solution") -> list[dict]:
    """The teacher's view of a record {problem, solution, answer}: the privileged context sits between the
    problem and the instruction, so the teacher's prompt ends exactly as the student's does. "other": the record's
    "solution" is another problem's (the caller swapped it in); "none": the student's view."""
    if context == "none":
        return student_messages(record["problem"])
    if context == "other":
        context = "solution"
    shown, transition = TEACHER_CONTEXTS[context]
    privileged = shown.format(solution=record.get("solution"), answer=record.get("answer"))
    return [{"role": "user", "content": f"{record['problem']}\n\n{privileged}\n\n{transition}\n\n{INSTRUCTION}"}]

# -----------------------------------------------------------------------------
# 2. token ids


def chat_prompt_text(tokenizer, messages, thinking: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)


def chat_prompt_ids(tokenizer, messages, thinking: bool = False) -> list[int]:
    # render to text first: in transformers 5 apply_chat_template(tokenize=True) returns a dict-like object,
    # and add_special_tokens=False keeps the tokenizer from adding a BOS the template did not ask for
    text = chat_prompt_text(tokenizer, messages, thinking)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def student_prompt_ids(tokenizer, problem, thinking=False) -> list[int]:
    return chat_prompt_ids(tokenizer, student_messages(problem), thinking)


ASSISTANT = "<|im_start|>assistant\n"  # where the generation prompt of a Qwen3-style chat template starts


def teacher_prompt_ids(tokenizer, record, thinking=False, context="solution", student_thinking=None) -> list[int]:
    """The one place a teacher prompt is made (opsd.py, eval.py --teacher-context, sft.py's teacher-format
    examples, toy.py). context: "solution" (the reference solution) or "answer" (only the final answer).
    `thinking` is the teacher's own chat-template setting; the rollout it scores was written after the
    *student's* generation prompt, so the teacher's prompt ends with the student's assistant prefix
    (student_thinking, default: the same as the teacher's). With Qwen3's template the two differ only by the
    empty `<think>\n\n</think>\n\n` of thinking off: a thinking teacher scoring a non-thinking rollout gets
    that block back, so the rollout's first token is scored where the student wrote it (the official code
    leaves it out: its issue #10), and a non-thinking teacher scoring a thinking rollout loses it."""
    ids = chat_prompt_ids(tokenizer, teacher_messages(record, context), thinking)
    if student_thinking is None or student_thinking == thinking:
        return ids
    own, wanted = (assistant_prefix(tokenizer, t) for t in (thinking, student_thinking))
    if ids[len(ids) - len(own):] != own:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: the chat template's generation prompt does not end in "
                         f"{tokenizer.decode(own)!r}; cannot align the teacher's prompt with the student's")
    return ids[:len(ids) - len(own)] + wanted


def assistant_prefix(tokenizer, thinking) -> list[int]:
    """The ids the generation prompt ends with, from the assistant tag on: what a thinking setting adds."""
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "x"}], thinking)
    tag = tokenizer(ASSISTANT, add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(ids) - len(tag), -1, -1) if ids[i:i + len(tag)] == tag]
    if not starts:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: no {ASSISTANT!r} in its generation prompt")
    return ids[starts[0]:]


REFERENCE_CUT = "\n[... the rest of the reference solution is cut here ...]"


def cut_reference(tokenizer, record, max_tokens):
    """(record, cut?): the reference solution cut to its first max_tokens tokens and marked, so the teacher
    knows it is incomplete; the problem and the instruction are never cut. None: no limit."""
    if max_tokens is None or not record.get("solution"):
        return record, False
    ids = tokenizer(record["solution"], add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return record, False
    return {**record, "solution": tokenizer.decode(ids[:max_tokens]) + REFERENCE_CUT}, True


def record_prompt_text(tokenizer, record, thinking=False, context=None) -> str:
    """The text of a record's prompt (before the assistant-prefix alignment of record_prompt_ids)."""
    if record.get("reference"):  # sft.py's teacher-format example: the reference is in the prompt
        messages = teacher_messages({**record, "solution": record["reference"]})
    elif context is None:
        messages = student_messages(record["problem"])
    else:
        messages = teacher_messages(record, context)
    return chat_prompt_text(tokenizer, messages, thinking)


def record_prompt_ids(tokenizer, record, thinking=False, context=None, student_thinking=None,
                      max_reference_tokens=None) -> list[int]:
    """A record's prompt ids: the student's, or with a teacher context the teacher's as opsd.py makes it (the
    reference cut to max_reference_tokens, the assistant prefix the student's); a record with a "reference"
    (sft.py's teacher-format example): its teacher prompt."""
    if record.get("reference"):
        return teacher_prompt_ids(tokenizer, {**record, "solution": record["reference"]}, thinking)
    if context is None:
        return student_prompt_ids(tokenizer, record["problem"], thinking)
    cut_record = cut_reference(tokenizer, record, max_reference_tokens)[0]
    return teacher_prompt_ids(tokenizer, cut_record, thinking, context, student_thinking)


def normalized_bytes(tokenizer, text) -> int:
    """The UTF-8 length of the text as the tokenizer's normaliser leaves it: no tokenisation gives more tokens (a
    token covers at least one byte), so a text this short fits without being tokenised."""
    normalizer = tokenizer.backend_tokenizer.normalizer
    if normalizer is not None:
        text = normalizer.normalize_str(text)
    return len(text.encode("utf-8"))


def most_tokens(tokenizer, texts) -> tuple[str, int]:
    """(the text with the most tokens, how many). Sorted by length in bytes and tokenised only while a longer one can
    still come: a token covers at least one byte of the normalised text."""
    longest = None
    most = -1
    for text in sorted(texts, key=lambda t: normalized_bytes(tokenizer, t), reverse=True):
        if normalized_bytes(tokenizer, text) <= most:
            break
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokens > most:
            longest = text
            most = tokens
    return longest, most


def prompts_too_long(tokenizer, records, room, thinking=False, context=None, student_thinking=None,
                     max_reference_tokens=None, batch=256):
    """[(record, tokens)] for the records whose prompt (record_prompt_ids) is longer than `room` tokens. Only a
    prompt whose text is longer than `room` bytes is tokenised: a token covers at least one byte of the normalised
    text, and the aligned assistant prefix adds at most its own length, so a shorter one fits. Those are tokenised
    `batch` at a time (the fast tokenizer spreads a batch over the cores) unless a reference cut or the prefix
    alignment changes the ids, which take record_prompt_ids one at a time."""
    aligned = context is not None and student_thinking is not None and student_thinking != thinking
    slack = len(assistant_prefix(tokenizer, student_thinking)) if aligned else 0
    one_at_a_time = aligned or (context is not None and max_reference_tokens is not None)
    candidates = []  # (record, its prompt text): the ones the byte bound cannot clear
    for record in records:
        text = record_prompt_text(tokenizer, record, thinking, context)
        if normalized_bytes(tokenizer, text) + slack > room:
            candidates.append((record, text))
    if one_at_a_time:
        lengths = [len(record_prompt_ids(tokenizer, record, thinking, context, student_thinking,
                                         max_reference_tokens)) for record, _ in candidates]
    else:  # the text is what record_prompt_ids tokenises
        lengths = []
        for start in range(0, len(candidates), batch):
            texts = [text for _, text in candidates[start:start + batch]]
            lengths += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [(record, length) for (record, _), length in zip(candidates, lengths) if length > room]


def stop_token_ids(tokenizer, model_path=None) -> list[int]:
    """<|im_end|> ends a chat turn; eos (<|endoftext|> for Qwen3 base) also stops a model that forgot the template.
    With model_path, also the eos ids of its generation_config.json, which vLLM always stops on (Qwen3 lists
    <|im_end|> and <|endoftext|>): both samplers stop on exactly these."""
    ids = []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither <|im_end|> nor an eos token")
    if model_path is not None:
        from transformers import GenerationConfig
        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        ids += [t for t in ([] if eos is None else [eos] if isinstance(eos, int) else eos) if t not in ids]
    return ids


def completion_ids(tokenizer, text) -> list[int]:
    # SFT targets end with the turn's stop token, so the model learns to stop
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [stop_token_ids(tokenizer)[0]]

# -----------------------------------------------------------------------------
# 3. data

TRAIN_DATA = ("siyanzhao/Openthoughts_math_30k_opsd", "train")
BENCHMARKS = {"aime24": ("HuggingFaceH4/aime_2024", "train"), "aime25": ("yentinglin/aime_2025", "train"),
              "hmmt25": ("MathArena/hmmt_feb_2025", "train"), "amobench": ("meituan-longcat/AMO-Bench", "test"),
              "math500": ("HuggingFaceH4/MATH-500", "test")}
PROBLEM_COLUMNS = ("problem", "Question", "question", "prompt")
ANSWER_COLUMNS = ("answer", "Answer")
FILE_FORMATS = (".jsonl", ".json", ".parquet")


class UserError(ValueError):
    """A bad option, file or record, with a message that names it. Every script prints it as one line and
    exits with status 2 (plumbing.run_script): the user has something to fix, not a bug to report."""


def read_jsonl(path: str, torn_tail_ok: bool = False) -> tuple[list[dict], int]:
    """(rows, bytes of complete lines) of a JSON-lines file; a bad line (not UTF-8, not JSON) is an error naming
    the file and line. torn_tail_ok: a last line without its newline is a writer killed mid-line (a log, a samples
    file): it is left out, and the byte count lets the caller cut it off before appending. Otherwise it is a row."""
    rows, complete = [], 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if torn_tail_ok and not line.endswith(b"\n"):
                break
            text = _utf8_text(path, line, number)
            if text.strip():
                try:
                    rows.append(json.loads(text))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {number} is not valid JSON ({e})") from e
            complete += len(line)
    return rows, complete


def _utf8_text(path: str, data: bytes, first_line: int = 1) -> str:
    """`data` (read from `path`, starting at line `first_line`) as text. JSON files are UTF-8: other bytes (a file
    saved as Latin-1) are an error naming the file and the line they are on, not a UnicodeDecodeError."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise UserError(f"{path}: line {line} is not UTF-8 (byte {data[e.start]:#04x}: {e.reason})") from e


def _read_rows(source: str, split: str | None) -> list[dict]:
    if os.path.exists(source) or source.endswith(FILE_FORMATS) or source.startswith((".", "/", "~")):
        if not os.path.isfile(source):
            raise UserError(f"no such data file {source!r}")
        if not source.endswith(FILE_FORMATS):
            raise UserError(f"{source}: unsupported data file format; use one of {', '.join(FILE_FORMATS)}")
        if source.endswith(".parquet"):
            import pyarrow.parquet  # a dependency of datasets; lighter than building a Dataset
            return pyarrow.parquet.read_table(source).to_pylist()
        if source.endswith(".json"):
            with open(source, "rb") as f:
                text = _utf8_text(source, f.read())
            if text.lstrip().startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as e:
                    raise UserError(f"{source}: not valid JSON ({e})") from e
            # otherwise datasets' to_json format: one object per line
        return read_jsonl(source)[0]
    import datasets  # lazily: importing prompts must stay cheap
    hf_id, default_split = BENCHMARKS.get(source, (source, "train"))
    return list(datasets.load_dataset(hf_id, split=split or default_split))


def _field(row: dict, names) -> str | None:
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip():
            return str(value)  # AIME25 stores answers as ints
    return None


def load_records(source: str, split: str | None = None, require=("problem", "answer"),
                 limit: int | None = None) -> list[dict]:
    """Rows {id, problem, solution, answer, reference} from a prompts.BENCHMARKS key, a local .jsonl/.json/
    .parquet file or a Hugging Face id. A missing or empty required field is an error naming the row."""
    rows = _read_rows(source, split)
    records, dropped = [], 0
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{source}: row {index} is a {type(row).__name__}, not an object")
        if row.get("answer_type") == "description":
            dropped += 1  # AMO-Bench proof-like answers need an LLM judge, which we do not run
            continue
        solution = _field(row, ("solution",))
        record = {"id": index, "problem": _field(row, PROBLEM_COLUMNS), "solution": solution,
                  "answer": _field(row, ANSWER_COLUMNS),
                  "reference": _field(row, ("reference",))}  # sft.py: a teacher-format example
        if record["answer"] is None and solution is not None:
            record["answer"] = extract_boxed(solution)  # OPSD train: the gold is the reference's last box
        for name in require:
            if record[name] is None:
                columns = {"problem": PROBLEM_COLUMNS, "answer": ANSWER_COLUMNS}.get(name, (name,))
                present = [c for c in columns if c in row]
                why = f"its {present[0]!r} is empty" if present else \
                    f"it has no {name!r} column (columns: {sorted(row)})"
                if name == "answer" and solution is not None:
                    why += " and its solution has no \\boxed{} answer"
                raise UserError(f"{source}: row {index} has no {name}: {why}")
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if dropped:
        print(f"load_records({source}): dropped {dropped} rows with answer_type='description' (need an LLM judge)")
    if not records:
        raise UserError(f"{source}: no records" + (f" (all {dropped} need an LLM judge)" if dropped else ""))
    return records

# -----------------------------------------------------------------------------
# 4. answer extraction

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_SPACES, _BARE_ANSWER = re.compile(r"\s*"), re.compile(r"[^\s$]*")


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (nested braces balanced), or of `\\boxed 5`; else None."""
    starts = [m.end() for m in _BOX.finditer(text)]
    for start in reversed(starts):
        # look at offsets, never at a copy of the rest of the text: a candidate that turns out to be prose then
        # costs only the spaces before the next candidate, and the search stays linear in len(text)
        body = _SPACES.match(text, start).end()
        if text.startswith("{", body):
            depth = 0
            for i, char in enumerate(text[body:]):  # one copy per call: this branch always returns
                depth += (char == "{") - (char == "}")
                if depth == 0:
                    return text[body + 1:body + i]
            return None  # the last box never closes (a truncated completion): no answer
        if start < body < len(text):
            return _BARE_ANSWER.match(text, body).group(0)  # "\boxed 5"
        # "\boxed" followed by something else (prose mentioning the macro): look at the box before it
    return None


_SYMBOLS = {"−": "-", "–": "-", "π": "\\pi ", "∞": "\\infty ", "×": "\\times ", "·": "\\cdot ", "√": "\\sqrt",
            "≤": "\\le ", "≥": "\\ge ", "½": "\\frac{1}{2}"}


def latex_fixups(answer: str) -> str:
    """The clean-up math-verify needs: unicode math symbols, $ wrappers, a sentence's final full stop."""
    for symbol, latex in _SYMBOLS.items():
        answer = answer.replace(symbol, latex)
    answer = answer.strip().strip("$").strip()
    answer = re.sub(r"(\\[,;:! ]|\s)*\.$", "", answer)  # "0.75." ends a sentence; math-verify rejects it
    return answer.strip()


def normalize_answer(answer: str) -> str:
    """A whitespace-free canonical string, so trivially different spellings compare equal as strings."""
    s = latex_fixups(answer)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree", "", s)
    s = re.sub(r"\\?%|\\\$", "", s)
    s = s.replace("\\!", "")  # MATH writes 10,\!000: a negative space glues the digits together
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        # 1,000 -> 1000 only when the whole answer is one number, never "1,2"; and checked before the spaces go,
        # as "1, 100" is the list {1, 100}, not 1100 (math-verify too reads 1,100 as 1100 and 1, 100 as a set)
        s = s.replace(",", "")
    s = re.sub(r"\\[,;: ]|\s", "", s)
    return s.rstrip(".")

# -----------------------------------------------------------------------------
# 5. grader: math-verify in a worker subprocess, string compare in this one

MAX_ANSWER_CHARS = 2000  # longer "answers" are rambling, not answers; only the string compare sees them
_STARTUP_SECONDS = 120  # importing sympy on a loaded node can be slow; the per-call timeout starts after
_worker, _worker_pid, _lock = None, None, threading.Lock()
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)")
_cache: dict[tuple[str, str], bool] = {}  # math-verify's verdicts: GRPO rollouts repeat answers
# the longest timeout a pair ran past: not a verdict (a longer timeout may get one), but it stops a slow answer
# from costing the same timeout twice
_gave_up: dict[tuple[str, str], float] = {}


def _gone(pid):
    """Whether process `pid` has exited. On Linux a process killed but not yet reaped by its own parent is a zombie:
    gone, though its pid still answers os.kill(pid, 0), and it stays one for as long as that parent does not wait
    for it. So read its state from /proc (Z: zombie, X: dead); os.kill is the fallback where there is no /proc."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            return True
        state = stat.rsplit(")", 1)[1].split()[0]  # after the command name, which may hold spaces and ")"
        return state in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _serve_grader(parent):
    """The worker: one JSON [gold, prediction] per stdin line, "1" or "0" per stdout line. It must not outlive a
    killed parent, and sympy can compute for minutes without reading stdin or releasing the GIL (one huge integer
    power), so a thread of its own could not notice: a forked watchdog process kills it when the parent is gone."""
    if os.fork() == 0:
        os.close(0)  # the pipes are the worker's: its death must read as EOF at once
        os.close(1)
        worker = os.getppid()
        while os.getppid() == worker:  # the worker lives...
            if _gone(parent):  # ...and its parent does not
                os.kill(worker, 9)
            time.sleep(0.5)
        os._exit(0)
    import logging
    from math_verify import LatexExtractionConfig, parse, verify
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": our kill is the timeout
    reply = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything else printing to stdout must not corrupt the protocol
    reply.write(b"ready\n")
    for line in sys.stdin.buffer:
        gold, pred = json.loads(line)
        # `$...$`: bare gold LaTeX mis-parses (2\sqrt{3} -> 2); LaTeX-only for the prediction: the Expr
        # fallback grabs stray numbers. No signal timeouts: the parent kills us instead.
        try:
            ok = verify(parse(f"${gold}$", parsing_timeout=None),
                        parse(f"${pred}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None),
                        timeout_seconds=None)
        except Exception:  # math-verify catches most errors itself; whatever escapes means "not verified"
            ok = False
        reply.write(b"1\n" if ok else b"0\n")


def _stop_worker():
    global _worker
    if _worker is not None and _worker_pid == os.getpid():  # a forked child must not kill its parent's worker
        _worker.kill()
        _worker.wait()
    _worker = None


def _forget_worker_after_fork():
    # the child shares the parent's pipes; talking on them would interleave replies. Start afresh.
    global _worker, _lock
    _worker, _lock = None, threading.Lock()


atexit.register(_stop_worker)
os.register_at_fork(after_in_child=_forget_worker_after_fork)


def _read_line(process, seconds: float) -> bytes | None:
    """One reply line from the worker, or None if it took longer than `seconds` or died."""
    deadline, fd, line = time.monotonic() + seconds, process.stdout.fileno(), b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 64)
        if not chunk:
            return None
        line += chunk
    return line


def _start_worker():
    global _worker, _worker_pid
    _worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--grader-worker", str(os.getpid())],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    _worker_pid = os.getpid()
    if _read_line(_worker, _STARTUP_SECONDS) != b"ready\n":
        _stop_worker()
        # an environment fault (math-verify missing), not a bad answer: grading on would silently change scores
        raise RuntimeError("the math-verify grader worker failed to start; see its error above")


def _math_verify(gold: str, pred: str, timeout: float) -> bool | None:
    """math-verify's verdict, or None when the worker ran past `timeout` or died: no verdict. One request at a
    time, and a worker in doubt (timed out, interrupted) is killed: a late reply can never be read as the
    answer to the next request."""
    try:
        if _worker is None:
            _start_worker()
        _worker.stdin.write(json.dumps([gold, pred]).encode() + b"\n")
        reply = _read_line(_worker, timeout)
    except BrokenPipeError:  # the worker died (e.g. sympy blew the C stack): this answer is not verified
        reply = None
    except BaseException:  # interrupted (KeyboardInterrupt, a bug) with a request maybe in flight
        _stop_worker()
        raise
    if reply not in (b"1\n", b"0\n"):
        _stop_worker()  # timed out or died; the next call starts a fresh one
        return None
    return reply == b"1\n"


def grade(completion: str, gold: str, timeout: float = 5.0) -> bool:
    """True if the last box of `completion` equals `gold` (bare or boxed). Never raises on input, never hangs.

    `timeout`: the seconds math-verify may spend on this pair; anything but a positive number is a caller's bug."""
    if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise ValueError(f"grade: timeout must be a positive number of seconds, not {timeout!r}")
    if not isinstance(completion, str) or not isinstance(gold, str):
        return False
    pred = extract_boxed(completion)
    gold = extract_boxed(gold) if _BOX.search(gold) else gold
    if pred is None or gold is None:
        return False
    pred, gold = latex_fixups(pred), latex_fixups(gold)
    if not pred or not gold:
        return False
    pred_key, gold_key = normalize_answer(pred), normalize_answer(gold)
    if pred_key == gold_key:
        return True  # cheap, and rescues spellings math-verify rejects
    if _NUMBER.fullmatch(pred_key) and _NUMBER.fullmatch(gold_key) and "%" not in pred + gold:
        # two plain numbers (every AIME answer) are compared exactly: cheaper than the worker, and math-verify
        # rounds at 6 absolute decimals, calling 0.0000001 and 0.0000002 equal. 10\% vs 0.1 is math-verify's call.
        return Decimal(pred_key) == Decimal(gold_key)
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    key = (gold, pred)
    with _lock:
        if key not in _cache and _gave_up.get(key, 0) < timeout:
            if len(_cache) + len(_gave_up) >= 100_000:
                _cache.clear()
                _gave_up.clear()
            verdict = _math_verify(gold, pred, timeout)
            if verdict is None:
                _gave_up[key] = timeout
            else:
                _cache[key] = verdict
        return _cache.get(key, False)


if __name__ == "__main__" and sys.argv[1:2] == ["--grader-worker"]:
    _serve_grader(int(sys.argv[2]))

"""
The CPU toy world: a task, a tokenizer and a model small enough that OPSD, GRPO and SFT can be run, and
compared, on two CPU cores in minutes, with no download.

Task: long multiplication of a 3-6 digit number by one digit (2-9). The student writes one line per digit,
right to left, with the carry (`8*6+0=48`), then the answer in `\\boxed{}`; reading the digits in reverse and
assembling the answer is where a tiny model errs. The reference solutions y* come in two settings:
  own     written in the student's own style (the digit lines above): SFT on them is nearly on-policy;
  expert  written the way a different solver would, by partial products left to right
          (`3456*7 = 3000*7 + 400*7 + 50*7 + 6*7 = 21000 + 2800 + 350 + 42 = 24192`): SFT on them is
          off-policy, as SFT on OpenThoughts traces is for Qwen3 in the paper.
In both, the OPSD teacher reads the reference and answers in the student's own style.

The warm start (`python toy.py prepare`) trains a tiny Qwen3 from scratch with sft.py on a mix of
student-format examples (problem -> own-style solution) and teacher-format examples (problem + reference ->
own-style solution), some of them with the reference of *another* problem and that problem's solution as the
target, so the teacher learns to use what the reference says, as an instruct LLM arrives able to. It stops
when the student's greedy accuracy on a validation split reaches --target (never measured on the test split),
so every machine stops in the same regime, whatever its arithmetic.

  python toy.py                               # prepare if needed, run OPSD for a few minutes, print accuracies
  python toy.py prepare [--references expert] # (re)build the tokenizer, data and warm start
  python toy.py opsd|grpo|sft|eval [flags]    # a script in the toy world: its toy settings (PRESETS), then flags
Files go under toy_cache/<references>/ (or $OPSD_TOY_CACHE/<references>/). The scripts know nothing of the toy
world: this file drives them (delete it and they still work).
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time

import eval as evaluation
import grpo
import models
import opsd
import plumbing
import prompts
import samplers
import sft

# -----------------------------------------------------------------------------
# 1. the task


def split_of(a, b):
    # a fixed ~10% of (a, b) pairs is the test split and another ~10% the validation split: a stable hash,
    # so the splits never overlap
    bucket = int(hashlib.md5(f"{a}*{b}".encode()).hexdigest(), 16) % 10
    return {0: "test", 1: "validation"}.get(bucket, "train")


def problem_text(a, b):
    return f"What is {a}*{b}?"


def own_solution(a, b):
    """The student's own style: one line per digit, right to left, with the carry."""
    lines, carry = [], 0
    for digit in reversed(str(a)):
        value = int(digit) * b + carry
        lines.append(f"{digit}*{b}+{carry}={value}")
        carry = value // 10
    return "\n".join(lines) + f"\n\\boxed{{{a * b}}}"


def expert_solution(a, b):
    """Another solver's style: the partial products of each digit's place value, left to right, then their sum."""
    places = [(int(d), 10 ** (len(str(a)) - 1 - i)) for i, d in enumerate(str(a)) if d != "0"]
    terms = " + ".join(f"{d * place}*{b}" for d, place in places)
    products = " + ".join(str(d * place * b) for d, place in places)
    return f"{a}*{b} = {terms} = {products} = {a * b}\n\\boxed{{{a * b}}}"


REFERENCES = {"own": own_solution, "expert": expert_solution}


def sample_pair(rng, split):
    while True:
        n_digits = rng.randint(3, 6)
        a = rng.randrange(10 ** (n_digits - 1), 10 ** n_digits)
        b = rng.randint(2, 9)
        if split_of(a, b) == split:
            return a, b


def make_records(split, n, seed, references="own"):
    """n records {id, problem, solution, answer, a, b}; the solution is the reference y* in the given style."""
    rng = random.Random(f"{split}-{seed}")
    records = []
    for i in range(n):
        a, b = sample_pair(rng, split)
        records.append({"id": i, "problem": problem_text(a, b), "solution": REFERENCES[references](a, b),
                        "answer": str(a * b), "a": a, "b": b})
    return records


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")

# -----------------------------------------------------------------------------
# 2. the tokenizer: byte-level BPE with digits split one per token, Qwen3's special tokens and a Qwen3-style
# chat template, saved as an ordinary HF tokenizer directory


CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def build_tokenizer(out_dir, vocab_size=400, n_examples=2000):
    """Train the toy tokenizer on toy-task text (both reference styles) and the prompt templates; save it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = []
    for _ in range(n_examples):
        a, b = sample_pair(rng, "train")
        for context in ("solution", "answer"):  # the toy world's own texts (the tokenizer is trained on them)
            record = {"problem": problem_text(a, b), "solution": expert_solution(a, b), "answer": str(a * b)}
            texts.append(prompts.teacher_messages(record, context)[0]["content"])
        texts += [prompts.student_messages(problem_text(a, b))[0]["content"], own_solution(a, b)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # as in Qwen3, <think> and </think> are added tokens but not special: they survive skip_special_tokens
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ["<think>", "</think>"]])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=["<|im_start|>"])
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return out_dir

# -----------------------------------------------------------------------------
# 3. the model: a tiny Qwen3 (the same code path as Qwen3-1.7B, ~0.9M parameters)


def model_config(tokenizer, hidden=128, layers=4, heads=4):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       head_dim=hidden // heads, max_position_embeddings=1024, tie_word_embeddings=True,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=None)


def build_tiny(root, hidden=32, layers=2, heads=2, split="train", n_problems=32, initializer_range=None, seed=0):
    """The tests' world: a tiny random Qwen3 + the toy tokenizer saved in root/model, n toy problems in
    root/toy.jsonl. Returns {root, model, data, tokenizer}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir, data = os.path.join(root, "model"), os.path.join(root, "toy.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(model_dir))
    config = model_config(tokenizer, hidden=hidden, layers=layers, heads=heads)
    if initializer_range:
        config.initializer_range = initializer_range
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    write_jsonl(data, make_records(split, n_problems, seed=0))
    return {"root": root, "model": model_dir, "data": data, "tokenizer": tokenizer}

# -----------------------------------------------------------------------------
# 4. the warm start data: student format (problem -> own-style solution), teacher format (problem + its
# reference -> own-style solution), and mismatched (problem + the reference of *another* problem -> that other
# problem's own-style solution). Without the mismatched ones a tiny model learns to compute on its own and
# ignores the reference (the teacher then knows no more than the student, and OPSD has nothing to teach).
# The shares put the teacher's learning to use the reference well before the student learns the task: with 15%
# teacher-format, 55% mismatched and 30% student-format examples (own references, validation, this machine) the
# teacher solves 57% at step 225 while the student solves 1%, and 81% against 45% at step 425. With 20/35/45 the
# student took off first (41% against the teacher's 17% at step 350), and where the teacher's late jump lands
# differs from machine to machine: another machine gave the teacher 88% at step 350, this one 17%.
# Expert references are harder to use: only their final answer can be copied into an own-style solution, and a tiny
# model learns to compute the digit lines (which always agree with that answer) rather than to copy it. Measured
# (student/teacher on validation): partial products with 15/55 give 55%/56% at step 375 and 87%/77% at 600, with
# 15/65 the teacher stays behind; a terse expert line (`3456*7: 42, 35+4=39, ...`) gives 57%/10% at step 350 and
# 97%/47% at 500. So in the expert setting the teacher starts level with the student, not ahead of it.
MIX = {"teacher": 0.15, "mismatched": 0.55}  # the rest is student-format; the same for both reference settings


def warmstart_records(n, references="own", seed=0):
    rng, style, mix = random.Random(f"warm-{seed}"), REFERENCES[references], MIX
    rows = []
    for _ in range(n):
        a, b = sample_pair(rng, "train")
        kind = rng.random()
        row = {"problem": problem_text(a, b), "solution": own_solution(a, b)}
        if kind < mix["teacher"]:
            row["reference"] = style(a, b)
        elif kind < mix["teacher"] + mix["mismatched"]:
            a2, b2 = sample_pair(rng, "train")
            row = {"problem": problem_text(a2, b2), "reference": style(a, b), "solution": own_solution(a, b)}
        rows.append(row)
    return rows

# -----------------------------------------------------------------------------
# 5. the toy settings of every script (`python toy.py opsd` etc.): LoRA r=16 on the tiny model; lr 1e-3 with warmup (a
# fresh optimizer at a high lr and no warmup wrecks the warm start); rollouts are <= ~70 tokens; one micro-batch holds
# a whole step on CPU; no torch.compile (at a vocabulary of ~400 it costs more than it saves: README).

COMMON = dict(lora_r=16, lora_alpha=32, lr=1e-3, warmup_ratio=0.1, max_new_tokens=96, temperature=1.0, thinking=False,
              micro_batch_size=32, chunk_size=4096, save_every=50, eval_every=50, sampler="hf", compile=False)
PRESETS = {"opsd": dict(COMMON, batch_size=32, max_steps=150),
           "grpo": dict(COMMON, batch_size=4, group_size=8, max_steps=150, lr=3e-4),
           "sft": dict(COMMON, batch_size=32, max_steps=150),
           "eval": dict(samples=1, temperature=0.0, max_new_tokens=96, thinking=False, sampler="hf")}
SCRIPTS = {"opsd": opsd, "grpo": grpo, "sft": sft, "eval": evaluation}


def paths(references="own", cache=None):
    here = os.path.dirname(os.path.abspath(__file__))
    cache = cache or os.environ.get("OPSD_TOY_CACHE") or os.path.join(here, "toy_cache")
    root = os.path.join(cache, references)
    return {name: os.path.join(root, file) for name, file in
            [("root", ""), ("base", "base"), ("warm", "warm"), ("teacher", "teacher"), ("train", "train.jsonl"),
             ("validation", "validation.jsonl"), ("test", "test.jsonl"), ("warmstart", "warmstart.jsonl")]}


def script_argv(script, references="own", periodic_eval=True):
    """A script's toy settings as command-line flags (flags given after them win): the warm start as --model, the
    train (eval: test) split's file as --data, the test split's as --eval-data (with periodic_eval), and PRESETS."""
    p = paths(references)
    values = dict(PRESETS[script], model=p["warm"], data=p["test" if script == "eval" else "train"],
                  out_dir=f"runs/toy{'' if references == 'own' else '-' + references}/{script}")
    if script != "eval" and periodic_eval:
        values.update(eval_data=p["test"])
    if script != "eval" and not periodic_eval:
        del values["eval_every"]
    argv = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [f"--no-{key.replace('_', '-')}"] if value is False else [flag, str(value)]
    return argv

# -----------------------------------------------------------------------------
# 6. prepare: tokenizer, data files and the warm start


def accuracy(model_dir, data_path, adapter=None, teacher_context=None, limit=None):
    """Greedy accuracy on a data file of the student prompt, or of the teacher prompt with this context
    ("solution": the reference; "answer": only the final answer)."""
    import torch
    model, tokenizer = models.load_model(model_dir, torch.device("cpu"))
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    records = prompts.load_records(data_path, require=("problem", "solution", "answer"), limit=limit)
    sampler = samplers.HFSampler(model, tokenizer, prompts.stop_token_ids(tokenizer, model_dir), batch_size=256)
    sampling = dict(max_new_tokens=PRESETS["eval"]["max_new_tokens"], temperature=0.0, top_p=1.0, top_k=0)
    return evaluation.run_eval(tokenizer, records, sampler, n=1, sampling=sampling, thinking=False,
                               teacher_context=teacher_context, batch_size=256)["avg"]


def prepare(references="own", target=0.40, check_every=25, max_steps=600, n_train=4000, n_validation=128, n_test=256,
            hidden=128, layers=4, cache=None):
    """Build the toy world under cache/<references>/. The warm start is sft.py from scratch on a 600-step schedule,
    stopped at the first multiple of check_every steps where the student's greedy accuracy on the validation split
    reaches `target` (or at the end of the schedule)."""
    from transformers import AutoTokenizer
    p = paths(references, cache)
    t0 = time.time()
    shutil.rmtree(p["root"], ignore_errors=True)
    build_tokenizer(p["base"])
    tokenizer = AutoTokenizer.from_pretrained(p["base"])
    model_config(tokenizer, hidden=hidden, layers=layers, heads=4).save_pretrained(p["base"])
    write_jsonl(p["train"], make_records("train", n_train, seed=1, references=references))
    write_jsonl(p["validation"], make_records("validation", n_validation, seed=3, references=references))
    write_jsonl(p["test"], make_records("test", n_test, seed=2, references=references))
    write_jsonl(p["warmstart"], warmstart_records(64 * max_steps, references))  # the whole schedule's data
    out = os.path.join(p["root"], "warm_run")
    print(f"toy: training the {references}-reference warm start from scratch: a {max_steps}-step schedule, stopped "
          f"once the student solves {target:.0%} of the validation problems (greedy, checked every {check_every} "
          "steps)", flush=True)
    sft.main(["--model", p["base"], "--from-scratch", "--data", p["warmstart"], "--max-steps",
              str(max_steps), "--batch-size", "64", "--micro-batch-size", "16", "--lr", "3e-3", "--warmup-ratio",
              "0.05", "--weight-decay", "0.01", "--chunk-size", "8192", "--out-dir", out, "--save-every",
              str(max_steps),
              "--keep", "1", "--no-thinking", "--eval-every", str(check_every), "--eval-data", p["validation"],
              "--max-new-tokens", str(PRESETS["eval"]["max_new_tokens"]), "--stop-at-eval-avg", str(target),
              "--sampler", "hf", "--no-compile", "--progress-bar"])
    final = plumbing.follow_latest(out)
    step = plumbing.checkpoint_step(final)
    student, teacher = accuracy(final, p["validation"]), accuracy(final, p["validation"], teacher_context="solution")
    if teacher < student + 0.2:  # the regime OPSD needs: a teacher clearly ahead of the student
        print(f"toy: WARNING: the teacher is not 20 points ahead of the student ({teacher:.1%} against {student:.1%}): "
              "OPSD will have little to teach with this warm start", flush=True)
    shutil.copytree(final, p["warm"], ignore=shutil.ignore_patterns("trainer_state.pt", "rng_rank*.pt", "run.json"))
    shutil.rmtree(out)
    with open(os.path.join(p["warm"], "warmstart.json"), "w") as f:
        json.dump({"references": references, "steps": step, "validation_student": student,
                   "validation_teacher": teacher}, f)
    print(f"toy: warm start ready after {step} steps, {time.time() - t0:.0f}s: validation student {student:.1%}, "
          f"teacher (reference in context) {teacher:.1%} -> {p['warm']}", flush=True)
    return p


def ensure_prepared(references="own", cache=None, **kwargs):
    """prepare() unless the warm start exists; a file lock makes concurrent callers wait for one build."""
    import fcntl
    p = paths(references, cache)
    os.makedirs(os.path.dirname(p["root"].rstrip(os.sep)), exist_ok=True)
    with open(p["root"].rstrip(os.sep) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(p["warm"], "config.json")):
            prepare(references, cache=cache, **kwargs)
    return p


def external_teacher(references="own", steps=150, cache=None):
    """A teacher for --teacher-model that is better than the warm start with no reference in its prompt: the warm
    start after `steps` steps of SFT on the references (toy.py sft's settings), the adapter merged into a whole model,
    under cache/<references>/teacher. Why this one: the student's architecture and tokenizer (so --teacher-model
    accepts it), ~35 points ahead of the warm start without a reference (SFT's row of the methods table), and about
    two minutes to build; a wider model trained the same way would need a warm start of its own (~8 minutes)."""
    import torch
    from peft import PeftModel
    p = ensure_prepared(references, cache)
    if os.path.exists(os.path.join(p["teacher"], "config.json")):
        return p["teacher"]
    run = os.path.join(p["root"], "teacher_run")
    print(f"toy: the external teacher: the {references}-reference warm start after {steps} steps of SFT on the "
          "references, merged", flush=True)
    sft.main(script_argv("sft", references, periodic_eval=False) + [
        "--max-steps", str(steps), "--save-every", str(steps), "--seed", "0", "--out-dir", run, "--overwrite",
        "--progress-bar"])
    model, tokenizer = models.load_model(p["warm"], torch.device("cpu"))
    merged = PeftModel.from_pretrained(model, plumbing.follow_latest(run)).merge_and_unload()
    merged.save_pretrained(p["teacher"] + ".tmp")
    tokenizer.save_pretrained(p["teacher"] + ".tmp")
    os.rename(p["teacher"] + ".tmp", p["teacher"])  # whole or absent
    shutil.rmtree(run)
    return p["teacher"]

# -----------------------------------------------------------------------------
# 7. the commands: the demo (prepare if needed, accuracies before, OPSD, accuracy after), prepare, and the scripts


def main(argv=None):
    parser = argparse.ArgumentParser(description="The CPU toy world: prepare it, run OPSD, print held-out "
                                     "accuracies; or run one script in it (the script's flags follow).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["run", "prepare", *SCRIPTS], default="run",
                        help="run: prepare if needed, then OPSD; prepare: (re)build the world; a script: run it here")
    parser.add_argument("--references", choices=sorted(REFERENCES), default="own", help="the references' style")
    parser.add_argument("--cache", default=None, help="the world's directory (default: $OPSD_TOY_CACHE or toy_cache/)")
    parser.add_argument("--steps", type=plumbing.positive_int, default=None, help="demo: OPSD steps (default 150)")
    parser.add_argument("--out-dir", default=None, help="demo: OPSD's out dir, replaced (runs/toy-demo/<references>)")
    parser.add_argument("--seed", type=plumbing.count, default=0, help="demo: OPSD's seed")
    parser.add_argument("--quick", action="store_true", help="a tiny end-to-end version (CI): small model, few steps")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SCRIPTS:  # the toy's own options are --references and --cache; the rest are the script's
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("command"), parser.add_argument("--references", choices=sorted(REFERENCES), default="own")
        parser.add_argument("--cache", default=None)
    args, rest = parser.parse_known_args(argv)
    if args.cache:
        os.environ["OPSD_TOY_CACHE"] = os.path.abspath(args.cache)  # read by paths()
    if args.command in SCRIPTS:  # the script's own flags come after the toy settings, and win
        p = paths(args.references)
        if not os.path.exists(os.path.join(p["warm"], "config.json")) and "--model" not in rest:
            raise prompts.UserError(f"no toy warm start at {p['warm']}; build it once with `python toy.py prepare "
                                    f"--references {args.references}` (a few minutes on 2 cores)")
        return SCRIPTS[args.command].main(script_argv(args.command, args.references) + rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    tiny = dict(target=0.0, check_every=20, max_steps=60, n_train=256, n_validation=32, n_test=32, hidden=64,
                layers=2) if args.quick else {}
    if args.command == "prepare":
        prepare(args.references, **tiny)
        return None
    p = ensure_prepared(args.references, **tiny)
    out_dir = args.out_dir or f"runs/toy-demo/{args.references}"
    t0 = time.time()
    before = accuracy(p["warm"], p["test"])
    teacher = accuracy(p["warm"], p["test"], teacher_context="solution")
    print(f"toy: warm start: student {before:.1%}, teacher (reference in context) {teacher:.1%}", flush=True)
    steps = args.steps or (4 if args.quick else PRESETS["opsd"]["max_steps"])
    extra = ["--batch-size", "8", "--micro-batch-size", "8"] if args.quick else []
    # the demo's own out dir, replaced each time (--overwrite): `python toy.py opsd` writes elsewhere
    summary = opsd.main(script_argv("opsd", args.references, periodic_eval=False) + [
        "--max-steps", str(steps), "--out-dir", out_dir, "--overwrite", "--seed", str(args.seed),
        "--save-every", str(steps), "--progress-bar"] + extra)
    after = accuracy(p["warm"], p["test"], adapter=plumbing.follow_latest(out_dir))
    result = {"student_before": before, "student_after": after, "teacher": teacher, "steps": steps,
              "generated_tokens": summary["generated_tokens_total"], "seconds": time.time() - t0}
    print(f"\nheld-out greedy accuracy ({len(prompts.load_records(p['test']))} problems, {args.references} "
          "references)\n"
          f"  {'student, warm start':32} {before:6.1%}\n  {f'student, after {steps} OPSD steps':32} {after:6.1%}\n"
          f"  {'teacher (reference shown)':32} {teacher:6.1%}\n"
          f"{result['generated_tokens']:,} generated tokens, {result['seconds']:.0f}s (excluding prepare); "
          f"the adapter is in {out_dir}")
    return result


if __name__ == "__main__":
    plumbing.run_script(main)

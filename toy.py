"""
The CPU toy world: a task, a tokenizer and a model small enough that OPSD, GRPO and SFT can be
run, and compared, on two CPU cores in minutes, with no download.

Task: long multiplication of a 3-6 digit number by one digit (2-9). The student writes one line per
digit, right to left, with the carry (`8*6+0=48`), then assembles the answer in `\\boxed{}`; reading
the digits in reverse and assembling the answer is where a tiny model errs. The reference solutions y*
in the training data do the same work in *another notation* (`6x8=48, carry 4`, then `so a*b=...`),
as OpenThoughts traces differ from Qwen3's own: SFT on them is off-policy (the student must switch
styles), while the OPSD teacher reads them and answers in the student's own style.

The warm start (`python toy.py prepare`) trains a tiny Qwen3 from scratch with sft.py on a mix of
student-format examples (problem -> own-style solution) and teacher-format examples (problem +
reference -> own-style solution, some with the reference of another problem, so the teacher learns to
use the reference), as an instruct LLM arrives able to use a reference in its context.

  python toy.py            # prepare if needed, run OPSD for a few minutes, print accuracies
  python toy.py prepare    # (re)build the tokenizer, data and warm start under toy_cache/
"""
import hashlib
import json
import os
import random
import sys
import time

import common
import opsd
import prompts

# -----------------------------------------------------------------------------
# 1. the task


def is_test_pair(a, b):
    # a fixed ~10% of (a, b) pairs is held out; a stable hash, so splits never overlap
    return int(hashlib.md5(f"{a}*{b}".encode()).hexdigest(), 16) % 10 == 0


def problem_text(a, b):
    return f"What is {a}*{b}?"


def student_solution(a, b):
    """The student's own style: one line per digit, right to left, with the carry."""
    lines, carry = [], 0
    for digit in reversed(str(a)):
        value = int(digit) * b + carry
        lines.append(f"{digit}*{b}+{carry}={value}")
        carry = value // 10
    return "\n".join(lines) + f"\n\\boxed{{{a * b}}}"


def sample_pair(rng, split):
    while True:
        n_digits = rng.randint(3, 6)
        a = rng.randrange(10 ** (n_digits - 1), 10 ** n_digits)
        b = rng.randint(2, 9)
        if is_test_pair(a, b) == (split == "test"):
            return a, b


def make_records(split, n, seed):
    """n records {id, problem, solution, answer}; the solution is the reference y*."""
    rng = random.Random(f"{split}-{seed}")
    records = []
    for i in range(n):
        a, b = sample_pair(rng, split)
        records.append({"id": i, "problem": problem_text(a, b), "solution": student_solution(a, b),
                        "answer": str(a * b), "a": a, "b": b})
    return records


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")

# -----------------------------------------------------------------------------
# 2. the tokenizer: byte-level BPE with digits split one per token, Qwen3's special tokens and a
# Qwen3-style chat template, saved as an ordinary HF tokenizer directory


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
    """Train the toy tokenizer on toy-task text and the prompt templates; save it to out_dir."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = []
    for _ in range(n_examples):
        a, b = sample_pair(rng, "train")
        texts.append(prompts.teacher_messages(problem_text(a, b), student_solution(a, b))[0]["content"])
        texts.append(prompts.student_messages(problem_text(a, b))[0]["content"])
        texts.append(student_solution(a, b))
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
# 3. the model: a tiny Qwen3 (same code path as Qwen3-1.7B, ~0.9M parameters)


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
# 4. the warm start data: 45% student format (problem -> solution), 20% teacher format (problem +
# its reference -> solution), 35% mismatched (problem + the reference of *another* problem -> that
# reference). Without the mismatched ones a tiny model learns to compute on its own and ignore the
# reference (FACTS.md), and the teacher would then know no more than the student.


def warmstart_records(n, seed=0):
    rng = random.Random(f"warm-{seed}")
    rows = []
    for _ in range(n):
        a, b = sample_pair(rng, "train")
        kind = rng.random()
        row = {"problem": problem_text(a, b), "solution": student_solution(a, b)}
        if kind < 0.20:
            row["reference"] = student_solution(a, b)
        elif kind < 0.55:
            a2, b2 = sample_pair(rng, "train")
            row = {"problem": problem_text(a2, b2), "reference": student_solution(a, b), "solution": student_solution(a, b)}
        rows.append(row)
    return rows

# -----------------------------------------------------------------------------
# 5. presets (`--preset toy` in every script) and prepare


def paths(cache=None):
    cache = cache or os.environ.get("OPSD_TOY_CACHE") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_cache")
    return {"base": os.path.join(cache, "base"), "warm": os.path.join(cache, "warm"),
            "train": os.path.join(cache, "train.jsonl"), "test": os.path.join(cache, "test.jsonl"),
            "warmstart": os.path.join(cache, "warmstart.jsonl")}


# LoRA r=16 on the tiny model; lr 1e-3 with warmup (a fresh optimizer at high lr and no warmup wrecks the
# warm start); rollouts are <= ~70 tokens; one micro-batch holds the whole step on CPU
_COMMON = dict(lora_r=16, lora_alpha=32, lr=1e-3, warmup_ratio=0.1, max_new_tokens=96, temperature=1.0,
               micro_batch_size=32, chunk_size=4096, save_every=50, eval_every=50, eval_samples=1, eval_temperature=0.0)
PRESETS = {
    "opsd": dict(_COMMON, batch_size=32, max_steps=150, out_dir="runs/toy/opsd"),
    "grpo": dict(_COMMON, batch_size=4, group_size=8, max_steps=150, lr=3e-4, out_dir="runs/toy/grpo"),
    "sft": dict(_COMMON, batch_size=32, max_steps=150, out_dir="runs/toy/sft"),
    "eval": dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=96, thinking=False, out_dir="runs/toy/eval"),
}


def preset(script, cache=None):
    p = paths(cache)
    if not os.path.exists(os.path.join(p["warm"], "config.json")):
        if "RANK" in os.environ:
            raise FileNotFoundError(f"--preset toy: no warm start at {p['warm']}; run `python toy.py prepare` once first")
        ensure_prepared(cache)
    return dict(PRESETS[script], model=p["warm"], data=p["test"] if script == "eval" else p["train"], split=None,
                eval_data=p["test"])


def ensure_prepared(cache=None, **kwargs):
    """prepare() unless the warm start exists; a file lock makes concurrent callers wait for one build."""
    import fcntl
    p = paths(cache)
    os.makedirs(os.path.dirname(p["warm"]), exist_ok=True)
    with open(os.path.join(os.path.dirname(p["warm"]), ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(p["warm"], "config.json")):
            prepare(cache, **kwargs)
    return p


def prepare(cache=None, warm_steps=350, n_train=4000, n_test=256, hidden=128, layers=4):
    """Tokenizer, data files and the warm start (sft.py from scratch), under cache/. The warm start runs
    the first warm_steps of a 600-step schedule: stopped where the student is still far from solving
    the task (~40% held-out; it would reach ~100%), while the teacher, reading the reference, is near 90%."""
    import shutil

    from transformers import AutoTokenizer

    import sft
    p = paths(cache)
    t0 = time.time()
    build_tokenizer(p["base"])
    tokenizer = AutoTokenizer.from_pretrained(p["base"])
    model_config(tokenizer, hidden=hidden, layers=layers, heads=4).save_pretrained(p["base"])
    write_jsonl(p["train"], make_records("train", n_train, seed=1))
    write_jsonl(p["test"], make_records("test", n_test, seed=2))
    write_jsonl(p["warmstart"], warmstart_records(64 * 600, seed=0))  # the whole schedule's data: stopping early sees a prefix
    out = os.path.join(os.path.dirname(p["warm"]), "warm_run")
    print(f"toy: training the warm start from scratch ({warm_steps} steps) -> {p['warm']}", flush=True)
    sft.main(["--model", p["base"], "--from-scratch", "--data", p["warmstart"], "--split", "train",
              "--max-steps", "600", "--stop-after", str(warm_steps), "--batch-size", "64", "--micro-batch-size", "16", "--lr", "3e-3",
              "--warmup-ratio", "0.05", "--weight-decay", "0.01", "--chunk-size", "8192",
              "--out-dir", out, "--save-every", str(warm_steps), "--keep", "1"])
    final = common.follow_latest(out)
    shutil.rmtree(p["warm"], ignore_errors=True)
    shutil.copytree(final, p["warm"], ignore=shutil.ignore_patterns("trainer_state.pt", "rng_rank*.pt"))
    shutil.rmtree(out)
    print(f"toy: prepared in {time.time() - t0:.0f}s", flush=True)
    return p

# -----------------------------------------------------------------------------
# 6. the one command: prepare if needed, accuracies before, OPSD, accuracy after


def accuracy(model_dir, test_path, adapter=None, teacher=False):
    """Greedy held-out accuracy of the student prompt (or of the teacher prompt, reference in context)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import eval as evaluation
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    records = prompts.load_records(test_path, require=("problem", "solution", "answer"))
    summary = evaluation.run_eval(model, tokenizer, records, opsd.HFSampler(model, tokenizer, batch_size=128), n=1,
                                  temperature=0.0, top_p=1.0, max_new_tokens=PRESETS["eval"]["max_new_tokens"],
                                  thinking=False, teacher=teacher)
    return summary["avg"]


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="The CPU toy world: prepare it, run OPSD, print held-out accuracies.")
    parser.add_argument("command", nargs="?", choices=["run", "prepare"], default="run", help="run (default) or prepare")
    parser.add_argument("--cache", default=None, help="where the tokenizer, data and warm start live (default toy_cache/)")
    parser.add_argument("--steps", type=int, default=None, help="OPSD steps (default: the toy preset's)")
    parser.add_argument("--out-dir", default="runs/toy/opsd", help="OPSD's output directory")
    parser.add_argument("--seed", type=int, default=0, help="OPSD seed")
    parser.add_argument("--quick", action="store_true", help="a tiny end-to-end version (CI): small model, few steps")
    args = parser.parse_args(argv)
    if args.cache:
        os.environ["OPSD_TOY_CACHE"] = os.path.abspath(args.cache)  # read by paths(), also inside opsd.main's preset
    p = paths()
    tiny = dict(warm_steps=30, n_train=256, n_test=32, hidden=64, layers=2) if args.quick else {}
    if args.command == "prepare":
        prepare(**tiny)
        return None
    ensure_prepared(**tiny)
    t0 = time.time()
    before = accuracy(p["warm"], p["test"])
    teacher = accuracy(p["warm"], p["test"], teacher=True)
    print(f"toy: warm start: student {before:.1%}, teacher (reference in context) {teacher:.1%}", flush=True)
    steps = args.steps or (4 if args.quick else PRESETS["opsd"]["max_steps"])
    extra = ["--batch-size", "8", "--micro-batch-size", "8"] if args.quick else []
    summary = opsd.main(["--preset", "toy", "--max-steps", str(steps), "--out-dir", args.out_dir, "--eval-every", "0",
                         "--seed", str(args.seed), "--save-every", str(steps)] + extra)
    after = accuracy(p["warm"], p["test"], adapter=common.resolve_checkpoint(args.out_dir))
    result = {"student_before": before, "student_after": after, "teacher": teacher, "steps": steps,
              "generated_tokens": summary["generated_tokens_total"], "seconds": time.time() - t0}
    print(f"\nheld-out greedy accuracy ({len(prompts.load_records(p['test']))} problems)\n"
          f"  {'student, warm start':32} {before:6.1%}\n  {f'student, after {steps} OPSD steps':32} {after:6.1%}\n"
          f"  {'teacher (reference shown)':32} {teacher:6.1%}\n"
          f"{result['generated_tokens']:,} generated tokens, {result['seconds']:.0f}s (excluding prepare)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

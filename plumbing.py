"""
The run plumbing the scripts share: the part a reader can skip. No algorithm lives here; it imports prompts.py only.

  1. options: typed, bounded values, the option groups every training script shares, presets, early checks;
  2. the out dir: one run per directory (a lock), never a silent reuse of an earlier run's;
  3. logging: a line per step (or a progress bar), log.jsonl, JSON-lines files that a resume cuts back;
  4. checkpoints: their layout (in one place), atomic writes, rotation, and the checks a --resume makes;
  5. the run: Run ties 2-4 together; run_script makes a user error one line (exit 2), Ctrl-C a saved step (130).
"""
import argparse
import copy
import errno
import fcntl
import fnmatch
import functools
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.distributed as dist

import prompts
from prompts import UserError

# -----------------------------------------------------------------------------
# 1. options


def bounded(kind, low, high=None, low_open=False):
    """An argparse type: a finite `kind` (int or float) in [low, high], or (low, high] with low_open; no upper bound
    when high is None."""
    if high is None:
        allowed = f"> {low}" if low_open else f">= {low}"
    else:
        allowed = f"in {'(' if low_open else '['}{low}, {high}]"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        too_low = value < low or (low_open and value == low)
        too_high = high is not None and value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be a finite number {allowed}, got {text}")
        return value
    parse.__name__ = kind.__name__  # what argparse prints as the expected type
    return parse


positive_int, count = bounded(int, 1), bounded(int, 0)
fraction, nonnegative = bounded(float, 0.0, 1.0), bounded(float, 0.0)
positive_float, probability = bounded(float, 0.0, low_open=True), bounded(float, 0.0, 1.0, low_open=True)
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear layer of a Qwen3 block


def compute_dtype(name, device):
    """--dtype auto: bf16 on CUDA (the paper's setting), fp32 on CPU (exact comparisons in tests)."""
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float32":
        return torch.float32
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device, dtype):
    """Every forward pass runs in this: bf16 matmuls; the softmaxes and losses upcast to fp32 themselves."""
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()



def model_options(parser, lora=True):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="Qwen/Qwen3-1.7B", help="HF id or local directory of the base model")
    group.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="auto: bf16 on CUDA")
    if lora:  # the training scripts' options
        group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                           help="torch.compile the per-token loss")
        group.add_argument("--lora-r", type=positive_int, default=64, help="LoRA rank")
        group.add_argument("--lora-alpha", type=positive_float, default=128, help="LoRA alpha")
        group.add_argument("--lora-dropout", type=fraction, default=0.0, help="LoRA dropout (0: sampling = scoring)")
        group.add_argument("--lora-targets", default=LORA_TARGETS, help="comma-separated module names")
        group.add_argument("--full-finetune", action="store_true", help="train every weight instead of LoRA")
        group.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")


def sampling_options(parser, temperature, max_new_tokens, gpu_memory, training=True):
    group = parser.add_argument_group("sampling")
    group.add_argument("--sampler", choices=["auto", "hf", "vllm"], default="auto", help="auto: vLLM on GPU, else HF")
    group.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help="rollout length limit")
    group.add_argument("--temperature", type=bounded(float, 0.0, 2.0), default=temperature, help="0: greedy")
    group.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling (1: off)")
    group.add_argument("--sampling-top-k", type=count, default=0, help="top-k sampling (0: off)")
    group.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=False, help="the student's Qwen3 "
                       "thinking mode")
    group.add_argument("--vllm-gpu-memory", type=probability, default=gpu_memory, help="GPU memory share for vLLM")
    if training:
        group.add_argument("--vllm-sleep", action=argparse.BooleanOptionalAction, default=True, help="vLLM sleeps "
                           "while training runs (GPU)")
    group.add_argument("--seed", type=count, default=0, help="seed for init, data order and sampling")
    return group


def training_parser(description, script, presets=None):
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.presets = presets or {}
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None, help="named option values; flags win")
    model_options(parser)
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=prompts.TRAIN_DATA[0], help="HF id, prompts.BENCHMARKS key or local file")
    group.add_argument("--split", default=prompts.TRAIN_DATA[1], help="dataset split (HF ids)")
    group.add_argument("--max-problems", type=positive_int, default=None, help="use only the first N problems")
    group.add_argument("--drop-long-rows", action="store_true",
                       help="drop rows whose prompt cannot fit the model's context (else: an error naming one)")
    group = parser.add_argument_group("optimization")
    group.add_argument("--lr", type=positive_float, default=2e-5, help="peak learning rate (AdamW)")
    group.add_argument("--warmup-ratio", type=fraction, default=0.1, help="linear warmup share; cosine after")
    group.add_argument("--weight-decay", type=nonnegative, default=0.0, help="AdamW weight decay")
    group.add_argument("--batch-size", type=positive_int, default=32, help="problems per step, over all ranks")
    group.add_argument("--micro-batch-size", type=positive_int, default=4, help="sequences per forward pass")
    group.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the data (no --max-steps)")
    group.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    group.add_argument("--max-grad-norm", type=nonnegative, default=1.0, help="gradient norm clip (0: off)")
    group.add_argument("--chunk-size", type=positive_int, default=128, help="positions per chunk of the loss")
    sampling_options(parser, temperature=1.1, max_new_tokens=2048, gpu_memory=0.4)
    group = parser.add_argument_group("output and checkpoints")
    group.add_argument("--out-dir", default=f"runs/{script}", help="logs and checkpoints (one run per directory)")
    group.add_argument("--overwrite", action="store_true", help="delete an earlier run's files from --out-dir")
    group.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N steps and at the end")
    group.add_argument("--keep", type=positive_int, default=2, help="newest checkpoints kept (and the best)")
    group.add_argument("--stop-after", type=positive_int, default=None, help="save and exit after this step")
    group.add_argument("--resume", default=None, help="a checkpoint, or an out dir (its latest): continue exactly")
    group.add_argument("--progress-bar", action="store_true", help="a progress bar instead of a line per step")
    group.add_argument("--wandb", default=None, help="wandb project (if wandb is installed)")
    group = parser.add_argument_group("periodic eval")
    group.add_argument("--eval-every", type=count, default=0, help="evaluate every N steps and at the end (0: off)")
    group.add_argument("--eval-data", default=None, help="problems for --eval-every: a file or a BENCHMARKS key")
    group.add_argument("--eval-samples", type=positive_int, default=1, help="samples per --eval-data problem")
    group.add_argument("--eval-temperature", type=bounded(float, 0.0, 2.0), default=0.0, help="0: greedy")
    group.add_argument("--eval-max-new-tokens", type=positive_int, default=None, help="default: --max-new-tokens")
    return parser


def parse_config(parser, argv=None, implied=None):
    """Parse argv over the chosen preset over the defaults. The preset is applied before the real parse, so
    `--preset X --help` shows the values the run will use; `implied` {option: {other: value}} sets what an option
    implies before the checks see it. args._defaults keeps the plain defaults: a setting an older checkpoint lacks
    is no change if it is at its default."""
    defaults = {action.dest: action.default for action in parser._actions}
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(parser.presets) or None, default=None)
    chosen, _ = first.parse_known_args(argv)
    if chosen.preset:
        parser.set_defaults(**parser.presets[chosen.preset])
    args = parser.parse_args(argv)
    args._given = given_options(parser, argv)
    for option, values in (implied or {}).items():
        if getattr(args, option):
            vars(args).update(values)
    check_model_path(args.model)
    if os.path.exists(getattr(args, "out_dir", "")) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out-dir {args.out_dir}: a file, not a directory")
    if getattr(args, "resume", None) and getattr(args, "overwrite", False):
        raise UserError("--resume and --overwrite: give one (--overwrite deletes what --resume continues)")
    if getattr(args, "eval_every", 0) and not args.eval_data:
        raise UserError("--eval-every needs --eval-data (the problems to evaluate on)")
    refuse_inert(args, shared_inert_rules(args))
    if args.sampler == "hf" or (args.sampler == "auto" and not torch.cuda.is_available()):
        unused = [name for name in ("vllm_gpu_memory", "vllm_sleep") if name in args._given]
        if unused:  # a launcher may pass these to every job: a note, not an error
            print0(f"note: --{unused[0].replace('_', '-')} has no effect: the HF sampler samples here")
    if getattr(args, "full_finetune", False) and args.sampler == "vllm":
        raise UserError("--sampler vllm needs LoRA: vLLM has no public API to load new full weights; use --sampler hf")
    if "lm_head" in getattr(args, "lora_targets", "").split(","):
        raise UserError("--lora-targets: lm_head cannot carry an adapter here (the loss multiplies by its base weight)")
    args._defaults = defaults
    return args


def given_options(parser, argv):
    """The options given on the command line (their dests), whatever their values: a preset's values and the
    defaults are not the user's choice, so only these can be refused as doing nothing (refuse_inert)."""
    explicit = copy.deepcopy(parser)
    explicit._defaults = {}  # a preset's set_defaults
    for action in explicit._actions:
        action.default = argparse.SUPPRESS
    return set(vars(explicit.parse_args(argv)))


def shared_inert_rules(args):
    """refuse_inert's rules for the options every script (or every training script) shares."""
    greedy = args.temperature == 0  # --top-p 1 and --sampling-top-k 0 say "off": given, they are no error
    rules = [("top_p", greedy and args.top_p < 1, "with --temperature 0 (greedy: the most likely token, always)"),
             ("sampling_top_k", greedy and args.sampling_top_k > 0,
              "with --temperature 0 (greedy: the most likely token, always)")]
    local_file = os.path.exists(getattr(args, "data", None) or "")
    rules.append(("split", local_file, "with a local --data file (it has no splits)"))
    if not hasattr(args, "eval_every"):  # eval.py: no training options
        return rules
    for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"):
        rules.append((name, args.full_finetune, "with --full-finetune (no adapter)"))
    for name in ("eval_data", "eval_samples", "eval_temperature", "eval_max_new_tokens"):
        rules.append((name, not args.eval_every, "without --eval-every"))
    identical = args.eval_temperature == 0 and args.eval_samples > 1
    rules.append(("eval_samples", identical, "above 1 with --eval-temperature 0: greedy samples are all the same"))
    rules.append(("epochs", args.max_steps is not None, "with --max-steps"))
    return rules


def refuse_inert(args, rules):
    """rules: (option, inert, why) triples. An option given on the command line that cannot act in this combination
    (inert) is an error naming it: a setting that silently does nothing is a wrong experiment."""
    for option, inert, why in rules:
        if inert and option in args._given:
            raise UserError(f"--{option.replace('_', '-')} does nothing {why}")


def check_model_path(path, option="--model"):
    """A local model directory must exist and hold a config.json; an HF id must be loadable (from the local cache,
    or the hub): either way a one-line error, before any data or model loads."""
    # "org/name" is an HF id; anything else is a local directory, and a missing one must not reach transformers,
    # whose message for it is about repo id characters
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or os.path.exists(path) or path.startswith("."):
        if not os.path.isdir(path):
            raise UserError(f"{option} {path}: no such directory (and not a Hugging Face id like Qwen/Qwen3-1.7B)")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise UserError(f"{option} {path}: no config.json there (not a model directory)")
        return
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(path)
    except OSError as e:  # not in the local cache, and the hub unreachable (after its retries) or the id unknown
        reason = str(e).strip().splitlines()[0][:200]
        raise UserError(f"{option} {path}: cannot be loaded ({reason}); download it while online, or pass a local "
                        "directory") from None


@functools.lru_cache(maxsize=4)  # loaded once per path: the data checks use it before the model loads
def load_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=4)
def model_config(path):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path)


def room_for_prompts(args, reserved, option):
    """How many tokens a prompt may have: the model's context (its config's max_position_embeddings) less the
    `reserved` positions `option` asks for (a rollout's --max-new-tokens); None if the model states no context."""
    context = getattr(model_config(args.model), "max_position_embeddings", None)
    if context is None:
        return None
    if reserved >= context:
        raise UserError(f"{option} {reserved} leaves no room for a prompt in the model's {context:,}-position context")
    return context - reserved


def longest_request(tokenizer, records, args, eval_records=None):
    """The most positions the run's sampler is asked for: the longest training prompt + --max-new-tokens, and with
    --eval-every the longest eval prompt + its budget. vLLM sizes its engine (max_model_len) for this."""
    prompt_texts = [prompts.record_prompt_text(tokenizer, r, args.thinking) for r in records]
    longest = prompts.most_tokens(tokenizer, prompt_texts)[1] + args.max_new_tokens
    if eval_records:
        eval_texts = [prompts.record_prompt_text(tokenizer, r, args.thinking) for r in eval_records]
        eval_budget = args.eval_max_new_tokens or args.max_new_tokens
        longest = max(longest, prompts.most_tokens(tokenizer, eval_texts)[1] + eval_budget)
    return longest


def check_same_tokenizer(model, teacher_model):
    """--teacher-model scores the student's token ids: its tokenizer must be the student's (the same vocabulary,
    special tokens and chat template) and its head as wide. A difference is one line naming it."""
    check_model_path(teacher_model, "--teacher-model")
    student = load_tokenizer(model)
    teacher = load_tokenizer(teacher_model)
    differences = []
    if student.get_vocab() != teacher.get_vocab():
        differences.append(f"the vocabulary ({len(student):,} tokens against {len(teacher):,})")
    if student.all_special_tokens != teacher.all_special_tokens or student.eos_token != teacher.eos_token or \
            student.pad_token != teacher.pad_token:
        differences.append("the special tokens")
    if student.chat_template != teacher.chat_template:
        differences.append("the chat template")
    logits = (model_config(model).vocab_size, model_config(teacher_model).vocab_size)
    if logits[0] != logits[1]:
        differences.append(f"the logits a position ({logits[0]:,} against {logits[1]:,})")
    if differences:
        raise UserError(f"--teacher-model {teacher_model}: its tokenizer differs from --model's in "
                        f"{' and '.join(differences)}; the teacher must read the student's token ids as the same text")


def fit_to_context(records, too_long, args, what, room, advice):
    """too_long: prompts.prompts_too_long's [(record, tokens)] against `room` tokens. None: the records. With
    --drop-long-rows they are dropped (one line says which); otherwise the first is an error that names it, says
    what would fit, and how to get there (`advice`, and --drop-long-rows)."""
    if not too_long:
        return records
    ids = [record["id"] for record, _ in too_long]
    if args.drop_long_rows:
        print0(f"--drop-long-rows: dropped {len(ids)} row(s) of {args.data} whose {what} is over {room:,} tokens: "
               f"ids {ids[:10]}{' ...' * (len(ids) > 10)}")
        dropped = set(ids)
        kept = [record for record in records if record["id"] not in dropped]
        if not kept:
            raise UserError(f"--drop-long-rows: no row of {args.data} fits")
        return kept
    record, tokens = too_long[0]
    raise UserError(f"{args.data}: row {record['id']}: the {what} ({tokens:,} tokens) is over the {room:,} that fit "
                    f"({len(ids)} row(s) in all); {advice}, or drop such rows with --drop-long-rows")


def request_seed(*key):
    """A seed from a key (the run's seed, the step, the problem): a request's samples depend on nothing else, not
    on what was sampled before it in the process, nor on which other requests share its call."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=4).digest(), "big") % 2**30


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)

# -----------------------------------------------------------------------------
# 2. the out dir: a second live run is refused (a lock), and so is a new run in a directory an earlier run
# wrote, unless it continues it (--resume) or replaces it (--overwrite). A run that never completed a
# checkpoint has nothing to continue: it is started again.

RUN_FILES = ("checkpoint-*", "best", "log.jsonl*", "rollouts*.jsonl*", "vllm_adapters", "samples*.jsonl",
             "samples.settings.json", "summary.json", "curve.*", ".lock")  # --overwrite deletes these, nothing else
LEFTOVERS = ("log.jsonl*", "rollouts*.jsonl*", "checkpoint-*.tmp", "vllm_adapters")  # killed before its first save


def not_matching(entries, patterns):
    """The entries that match none of the glob patterns."""
    return [e for e in entries if not any(fnmatch.fnmatch(e, pattern) for pattern in patterns)]


def claim_out_dir(out_dir, continuing, overwrite, master=True):
    """Apply the rule above (every rank); on rank 0 lock out_dir for this process (the lock dies with it,
    kill -9 included) and carry out --overwrite. Returns the open lock file: the caller closes it when it ends."""
    lock = None
    if master:
        try:
            os.makedirs(out_dir, exist_ok=True)
            lock = open(os.path.join(out_dir, ".lock"), "a+")
        except OSError as e:  # a read-only file system, a path below a regular file, no permission
            raise UserError(f"--out-dir {out_dir}: cannot be created or written ({e.strerror or e})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise UserError(f"--out-dir {out_dir}: another run is writing there (pid {lock.read().strip() or '?'})") \
                from None
    left = []
    if os.path.isdir(out_dir):
        left = [entry for entry in sorted(os.listdir(out_dir)) if entry != ".lock"]
    unfinished = left and not continuing and not not_matching(left, LEFTOVERS)
    if left and (overwrite or unfinished):
        foreign = not_matching(left, RUN_FILES)
        if foreign:
            raise UserError(f"--overwrite: {out_dir} holds files no run of ours wrote ({', '.join(foreign)}); "
                            "clear it by hand or pick another --out-dir")
        for entry in left if master else []:
            path = os.path.join(out_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print0(f"--out-dir {out_dir}: " + ("deleted the earlier run" if overwrite else
               f"the earlier run there never completed a checkpoint ({', '.join(left[:3])}): starting it again"))
    elif left and not continuing:
        raise UserError(f"--out-dir {out_dir} holds an earlier run ({', '.join(left[:4])}{', ...' * (len(left) > 4)}); "
                        f"continue it with --resume {out_dir}, replace it with --overwrite, or pick another --out-dir")
    if master:
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
    return lock

# -----------------------------------------------------------------------------
# 3. logging


def no_space(path, error):
    """A full disk as one line that names the directory, instead of torch's `basic_ios::clear` traceback."""
    full = getattr(error, "errno", None) == errno.ENOSPC or any(
        s in str(error) for s in ("No space left", "iostream error", "unexpected pos", "file write failed"))
    if not full and os.path.exists(path):
        full = shutil.disk_usage(path).free < 2**20
    return UserError(f"{path}: no space left on the device ({type(error).__name__}: {str(error)[:120]})") \
        if full else None


class JsonlFile:
    """Append-only JSON lines with a `step` field, flushed per write. On a resume from step s the rows of later
    steps (about to be written again) and a last line cut short by a crash are dropped first."""

    def __init__(self, path, resume_step=None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            rows, _ = prompts.read_jsonl(path, torn_tail_ok=True)
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows if row["step"] <= resume_step)
            os.replace(path + ".tmp", path)  # atomic: a crash here keeps the old file
        self.file = open(path, "a")

    def write(self, *rows):
        try:
            self.file.writelines(json.dumps(row) + "\n" for row in rows)
            self.file.flush()
        except OSError as e:
            raise no_space(os.path.dirname(self.path), e) or e


def over_ranks(world, device, sums=None, means=None, maxima=None):
    """Each rank's numbers combined over the ranks: `sums` added up, `means` averaged, `maxima` the largest.
    {name: number or 0-dim tensor} in, {name: float} out: one all_reduce and one host sync for each kind given."""
    groups = [(sums or {}, dist.ReduceOp.SUM, 1), (means or {}, dist.ReduceOp.SUM, world),
              (maxima or {}, dist.ReduceOp.MAX, 1)]
    combined = {}
    for values, op, divisor in groups:
        if not values:
            continue
        numbers = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()]
        tensor = torch.stack(numbers)
        if world > 1:
            dist.all_reduce(tensor, op=op)
        combined.update(zip(values, (tensor / divisor).tolist()))
    return combined


class StageClock:
    """Seconds spent in each stage of a step (`lap(stage)` ends one). On a GPU the clock is read after
    torch.cuda.synchronize(): kernels run asynchronously, so without it a stage would be charged with the work
    that the next one waits for."""

    def __init__(self, device):
        self.device = device
        self.seconds = defaultdict(float)
        self.start = self.last = self.now()

    def now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, stage):
        now = self.now()
        self.seconds[stage] += now - self.last
        self.last = now

    def total(self):
        return self.now() - self.start

# -----------------------------------------------------------------------------
# 4. checkpoints. The layout, in one place: OUT/checkpoint-NNNNNN/ holds the weights (a PEFT adapter,
# adapter_model.safetensors + adapter_config.json, loadable by PeftModel.from_pretrained and vLLM's LoRARequest;
# or a full model, model*.safetensors + config.json), the tokenizer, trainer_state.pt (optimizer, schedule, step,
# the script's own state), rng_rank<R>.pt per rank, and run.json (the script and its settings). Each is written to
# checkpoint-NNNNNN.tmp and renamed: complete or absent; the newest is the latest. OUT/best names the best eval's.

CHECKPOINT = "checkpoint-{:06d}"
# settings a resumed run may change: where and how often it writes, how it is split into jobs, speed knobs that
# leave the math unchanged; every other option must match the checkpoint's
RESUMABLE_CHANGES = {"resume", "stop_after", "out_dir", "overwrite", "wandb", "save_every", "keep", "eval_every",
                     "eval_data", "eval_samples", "eval_temperature", "eval_max_new_tokens", "micro_batch_size",
                     "chunk_size", "sampler", "vllm_gpu_memory", "vllm_sleep", "grad_checkpointing", "preset",
                     "compile", "progress_bar", "save_rollouts_every"}


def checkpoint_step(path):
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def weights_file(path):
    adapter = os.path.join(path, "adapter_model.safetensors")
    full = sorted(glob.glob(os.path.join(path, "model*.safetensors")))
    return adapter if os.path.exists(adapter) or not full else full[0]


def is_complete(path):
    return all(os.path.exists(os.path.join(path, f)) for f in ("run.json", "trainer_state.pt", "rng_rank0.pt")) and \
        os.path.exists(weights_file(path))


def complete_checkpoints(out_dir):
    return sorted((p for p in glob.glob(os.path.join(out_dir, "checkpoint-*[0-9]")) if is_complete(p)),
                  key=checkpoint_step)


def named(out_dir, name):
    """The checkpoint OUT/best names, or None."""
    path = os.path.join(out_dir, name)
    return os.path.join(out_dir, open(path).read().strip()) if os.path.exists(path) else None


def point(out_dir, name, checkpoint):
    with open(os.path.join(out_dir, name + ".tmp"), "w") as f:
        f.write(os.path.basename(checkpoint))
    os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))  # never an empty file


def follow_latest(path):
    """An out dir stands for its latest checkpoint, the newest complete one (each is renamed into place whole, and a
    resume from an older one deletes the newer ones first); anything else stands for itself."""
    complete = complete_checkpoints(path) if checkpoint_step(path) is None else []
    return complete[-1] if complete else path


PATH_SETTINGS = ("model", "data", "eval_data", "teacher_model")  # compared by what they point to, not by spelling


def identity(setting, value):
    """What a setting names: a local path by its real path (warm/, ./warm and an absolute path are one model), an
    HF id or any other value as it is."""
    if setting in PATH_SETTINGS and isinstance(value, str) and os.path.exists(value):
        return os.path.realpath(value)
    return value


def live_run_lock(out_dir):
    """A shared lock on another run's out dir, held while its checkpoint is read and loaded: a run still writing there
    (it holds the exclusive lock) could delete the checkpoint midway as it rotates. None if there is no lock file."""
    path = os.path.join(out_dir, ".lock")
    if not os.path.exists(path):
        return None
    lock = open(path)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"--resume: a live run is still writing in {out_dir}, and its rotation may delete the "
                        "checkpoint while it loads: wait for it to end, or copy the checkpoint elsewhere") from None
    return lock


def read_run_json(path):
    """A checkpoint's run.json: {"script", "step", "settings", ...}; a torn or foreign one is a one-line error."""
    file = os.path.join(path, "run.json")
    try:
        with open(file) as f:
            saved = json.load(f)
        if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict) or "script" not in saved:
            raise ValueError("no 'script' and 'settings' in it")
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        earlier = [c for c in complete_checkpoints(os.path.dirname(path)) if checkpoint_step(c) < checkpoint_step(path)]
        offer = f"; resume from the one before it: --resume {earlier[-1]}" if earlier else ""
        raise UserError(f"--resume: {file} is unreadable ({type(e).__name__}: {str(e)[:200]}){offer}") from None
    return saved


def read_checkpoint(args, script, world):
    """--resume: find the checkpoint and check that this script wrote it with the same settings and that its files
    are readable, all before any model loads. Returns (path, trainer state, this rank's RNG state, lock), lock being
    live_run_lock's for a checkpoint in another out dir (the caller closes it once the weights are loaded); or None
    for an out dir whose run never completed a checkpoint (it starts again from step 0)."""
    path = follow_latest(args.resume)
    if not os.path.exists(os.path.join(path, "run.json")):
        if any(glob.glob(os.path.join(args.resume, leftover)) for leftover in LEFTOVERS):
            print0(f"--resume {args.resume}: the run there never completed a checkpoint; starting it from step 0")
            return None
        raise UserError(f"--resume {args.resume}: no checkpoint there (no run.json; not a checkpoint dir, nor an out "
                        "dir with one)")
    run_dir = os.path.dirname(os.path.abspath(path))
    lock = None
    if run_dir != os.path.abspath(args.out_dir):  # resuming into the same dir: claim_out_dir locks it
        lock = live_run_lock(run_dir)
    saved = read_run_json(path)
    if saved["script"] != script:
        raise UserError(f"--resume {path}: written by {saved['script']}.py, not {script}.py")
    settings = saved["settings"]
    changed = {}
    for name, value in settings_of(args).items():
        saved_value = settings.get(name, args._defaults.get(name))  # one an older version did not save: its default
        if name not in RESUMABLE_CHANGES and identity(name, saved_value) != identity(name, value):
            changed[name] = (saved_value, value)
    if changed:
        raise UserError(f"--resume {path}: written with other settings: " + "; ".join(
            f"--{k.replace('_', '-')} was {old!r}, now {new!r}" for k, (old, new) in changed.items()))
    unknown = sorted(set(settings) - set(settings_of(args)))
    if unknown:
        print0(f"--resume: {path} has settings this version does not know, ignored: {', '.join(unknown)}")
    saved_world = saved.get("world", 1)
    if saved_world != world:
        print0(f"--resume: {path} was written by {saved_world} rank(s), resumed on {world}: the run goes on, but not "
               "bit for bit (the sum of the gradients over ranks and each rank's random state differ)")
    states = []
    rank = int(os.environ.get("RANK", 0))
    rng_file = f"rng_rank{rank}.pt" if os.path.exists(os.path.join(path, f"rng_rank{rank}.pt")) else "rng_rank0.pt"
    for file in ("trainer_state.pt", rng_file, os.path.basename(weights_file(path))):
        try:
            if file.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(os.path.join(path, file), "pt"):  # reads the header: a truncated file fails here
                    continue
            states.append(torch.load(os.path.join(path, file), map_location="cpu", weights_only=False))
        except Exception as e:  # a missing, truncated or corrupt file: all mean "unreadable"
            earlier = [p for p in complete_checkpoints(os.path.dirname(path))
                       if checkpoint_step(p) < checkpoint_step(path)]
            offer = f"; resume from the one before it: --resume {earlier[-1]}" if earlier else ""
            raise UserError(f"--resume: {os.path.join(path, file)} is unreadable ({type(e).__name__}: "
                            f"{str(e)[:200]}){offer}") from e
    return path, states[0], states[1], lock


def settings_of(args):
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def load_weights(path, model):
    """A checkpoint's weights into `model` (a PEFT model: the adapter; else every weight). A full model may miss
    only tied weights (saved once); any other missing or unexpected key is an error naming it."""
    from safetensors.torch import load_file
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        return set_peft_model_state_dict(model, load_file(weights_file(path)))
    state = {}
    for file in glob.glob(os.path.join(path, "model*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model, "_tied_weights_keys", None) or []
    tied = tied if isinstance(tied, (list, tuple, set)) else list(tied)  # a dict in newer transformers
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(f"{path}: the weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state

# -----------------------------------------------------------------------------
# 5. the run


class Run:
    """One training run's out dir, log and checkpoints. Created after the data loads and before the model does:
    every check (--eval-data, --resume, --out-dir) has run by then."""

    def __init__(self, args, script, rank, world, device, total_steps):
        self.args = args
        self.script = script
        self.rank = rank
        self.world = world
        self.device = device
        self.total_steps = total_steps
        self.master = rank == 0
        if args.batch_size % world:
            raise UserError(f"--batch-size {args.batch_size} must be divisible by the number of ranks ({world})")
        if args.stop_after is not None and args.stop_after >= total_steps:
            raise UserError(f"--stop-after {args.stop_after} does nothing: the run has {total_steps} steps")
        self.eval_records = None
        if args.eval_every:
            self.eval_records = prompts.load_records(args.eval_data, None, require=("problem", "answer"))
        self.checkpoint = None
        self.source_lock = None
        if args.resume:
            self.checkpoint = read_checkpoint(args, script, world)
        continuing = bool(args.resume)
        if self.checkpoint:
            self.source_lock = self.checkpoint[3]
        self.lock = claim_out_dir(args.out_dir, continuing, args.overwrite, self.master)
        if world > 1:
            dist.barrier()  # rank 0 has carried out --overwrite before anyone writes
        self.start_step = 0
        self.last_saved = None
        self.best = None
        self.bar = None
        self.wandb = None

    def restore(self, model, optimizer, scheduler):
        """The checkpoint's weights, optimizer, schedule and RNG on --resume (returns the script's saved state), or
        per-rank seeds on a fresh run (returns {}); then open the log."""
        args = self.args
        state = {}
        if self.checkpoint:
            path, state, rng, _ = self.checkpoint
            if os.path.abspath(os.path.dirname(path)) == os.path.abspath(args.out_dir) and self.master:
                for later in glob.glob(os.path.join(args.out_dir, "checkpoint-*[0-9]")):  # an abandoned continuation
                    if checkpoint_step(later) > state["step"]:
                        print0(f"--resume: deleting {later}, written after the resumed step")
                        shutil.rmtree(later)
            load_weights(path, model)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self.start_step = self.last_saved = state["step"]
            self.best = state.get("best")
            print0(f"resumed from {path} at step {self.start_step}")
            if self.source_lock:  # loaded: the other run may rotate it away now
                self.source_lock.close()
        else:
            torch.manual_seed(args.seed + 1 + self.rank)  # from here on each rank draws differently (dropout)
            random.seed(args.seed + 1 + self.rank)
        for partial in glob.glob(os.path.join(args.out_dir, "checkpoint-*.tmp")) if self.master else []:
            shutil.rmtree(partial)  # a save killed midway
        self.resume_step = self.start_step if args.resume else None  # JSON-lines files are cut back to it
        self.log_file = JsonlFile(os.path.join(args.out_dir, "log.jsonl"), self.resume_step) if self.master else None
        if self.master and args.progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.script, dynamic_ncols=True)
        if self.master and args.wandb:
            try:
                import wandb
                self.wandb = wandb.init(project=args.wandb, config=settings_of(args))
            except ImportError:
                print("--wandb given but wandb is not installed: logging to log.jsonl only")
        STOP.requested = False
        STOP.graceful = True
        STOP.saved = self.last_saved
        STOP.longest_step = 0.0
        self.step_end = time.monotonic()
        self.print(f"{self.script}: writing to {os.path.abspath(args.out_dir)} (log.jsonl, checkpoint-NNNNNN)")
        return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "step", "best")}

    def print(self, line):
        if self.master:
            self.bar.write(line) if self.bar else print(line, flush=True)

    def log(self, record, line):
        """A step's record to log.jsonl (and wandb), and its line to stdout (or the progress bar's postfix)."""
        if not self.master:
            return
        self.log_file.write(record)
        if self.wandb:
            self.wandb.log(record, step=record["step"])
        if self.bar and "eval" not in record:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix_str(line.split(" | ", 1)[-1][:80])
        else:
            self.print(line)

    def eval_due(self, step, total_steps):
        return self.args.eval_every > 0 and ((step + 1) % self.args.eval_every == 0 or step + 1 == total_steps)

    def evaluate(self, step, sampler, tokenizer, *, thinking, lora_request=None):
        """The periodic eval: --eval-samples samples per --eval-data problem from the current weights (lora_request:
        the adapter for vLLM, opsd.adapter_for), graded; logged as a record. A new best score makes this step's
        checkpoint `best`."""
        args, records = self.args, self.eval_records[self.rank::self.world]
        sampling = dict(max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens,
                        temperature=args.eval_temperature, top_p=1.0, top_k=0)
        rows = graded_samples(tokenizer, records, sampler, args.eval_samples, sampling, thinking, args.seed,
                              lora_request)
        totals = over_ranks(self.world, self.device, sums={"correct": sum(r["correct"] for r in rows),
                                                           "samples": len(rows),
                                                           "length": sum(r["length"] for r in rows)})
        summary = {"avg": totals["correct"] / totals["samples"], "mean_length": totals["length"] / totals["samples"],
                   "problems": len(self.eval_records), "samples": int(totals["samples"])}
        if self.best is None or summary["avg"] > self.best["avg"]:
            self.best = {"avg": summary["avg"], "step": step}
        self.log({"step": step, "eval": summary}, f"eval at step {step}: avg {summary['avg']:.4f} over "
                 f"{summary['problems']} problems (best {self.best['avg']:.4f} at step {self.best['step']})")
        return summary

    def end_step(self, step, model, tokenizer, optimizer, scheduler, state, stop=False):
        """After step `step` (0-based): checkpoint every --save-every steps, at the end, at --stop-after, on Ctrl-C,
        when the script says `stop`, and at a new best eval. True when the loop stops here."""
        now = time.monotonic()
        STOP.longest_step = max(STOP.longest_step, now - self.step_end)
        self.step_end = now
        requested = torch.tensor(float(STOP.requested), device=self.device)
        if self.world > 1:
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)  # every rank stops after the same step
        self.interrupted = bool(requested.item())
        stop = stop or self.interrupted or step + 1 == self.args.stop_after
        best = self.best is not None and self.best["step"] == step + 1
        if (step + 1) % self.args.save_every == 0 or step + 1 == self.total_steps or stop or best:
            self.save(step + 1, model, tokenizer, optimizer, scheduler, state)
        return stop

    def save(self, step, model, tokenizer, optimizer, scheduler, state):
        """Write checkpoint `step` (the layout above), point `best` at it if it is, and delete older ones
        beyond --keep, never the best. A full disk is one line; the partial checkpoint is removed."""
        out_dir, path = self.args.out_dir, os.path.join(self.args.out_dir, CHECKPOINT.format(step))
        tmp = path + ".tmp"
        try:
            if self.master:
                shutil.rmtree(tmp, ignore_errors=True)
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "best": self.best, **state}, os.path.join(tmp, "trainer_state.pt"))
                with open(os.path.join(tmp, "run.json"), "w") as f:
                    json.dump({"script": self.script, "step": step, "world": self.world,
                               "settings": settings_of(self.args)}, f, indent=1)
            if self.world > 1:
                dist.barrier()
            torch.save(rng_state(), os.path.join(tmp, f"rng_rank{self.rank}.pt"))
        except Exception as e:  # torch, safetensors and the OS each raise their own kind for a full disk
            error = no_space(out_dir, e)
            shutil.rmtree(tmp, ignore_errors=True)
            if error and self.last_saved:
                raise UserError(f"{error} while writing {os.path.basename(path)}; removed it. The previous checkpoint "
                                f"is intact: free some space and continue with --resume {out_dir}") from e
            if error:
                raise UserError(f"{error} while writing {os.path.basename(path)}, the run's first checkpoint; removed "
                                "it. Free some space and start the run again") from e
            raise
        if self.world > 1:
            dist.barrier()
        if self.master:
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
            if self.best is not None and self.best["step"] == step:
                point(out_dir, "best", path)
            spared = {os.path.abspath(p) for p in (path, named(out_dir, "best")) if p}
            older = [p for p in complete_checkpoints(out_dir)
                     if checkpoint_step(p) < step and os.path.abspath(p) not in spared]
            for old in older[:max(0, len(older) - (self.args.keep - 1))]:
                shutil.rmtree(old)
        if self.world > 1:
            dist.barrier()
        self.last_saved = STOP.saved = step
        return path

    def finish(self, sampler):
        """Shut the sampler down (vLLM needs the process group still alive), then the process group; say where the
        run is. A run stopped by Ctrl-C ends as interrupted (exit 130), its step saved."""
        if sampler is not None:
            sampler.close()
        STOP.graceful = False
        if self.bar:
            self.bar.close()
        if self.world > 1 and dist.is_initialized():  # (a vLLM engine's teardown may have destroyed it already)
            dist.destroy_process_group()
        if self.lock:  # the out dir is free now, whatever still refers to this run
            self.lock.close()
        where = os.path.join(self.args.out_dir, CHECKPOINT.format(self.last_saved)) if self.last_saved else "none"
        print0(f"{self.script}: log {os.path.join(self.args.out_dir, 'log.jsonl')}, latest checkpoint {where}" +
               (f", best {named(self.args.out_dir, 'best')} (avg {self.best['avg']:.4f})" if self.best else ""))
        if getattr(self, "interrupted", False):
            raise KeyboardInterrupt(f"stopped after step {self.last_saved}; continue with --resume {self.args.out_dir}")


def graded_samples(tokenizer, records, sampler, n, sampling, thinking, seed, lora_request=None, teacher_context=None):
    """n samples per record in one sampler call, each graded against the record's answer (prompts.grade):
    per record, a list of rows {completion, extracted, correct, length}. A record's samples depend only on the
    seed and the record (request_seed), so a resumed evaluation samples what the uninterrupted one did."""
    if teacher_context is None:
        prompt_ids = [prompts.student_prompt_ids(tokenizer, r["problem"], thinking) for r in records]
    else:
        prompt_ids = [prompts.teacher_prompt_ids(tokenizer, r, thinking, teacher_context) for r in records]
    seeds = [request_seed(seed, r.get("benchmark", "data"), r["id"]) for r in records]
    rows = []
    for record, samples in zip(records, sampler.generate(prompt_ids, n, sampling, seeds, lora_request)):
        for sample in samples:
            # the whole completion, thinking included, is graded: the answer is its last box
            text = tokenizer.decode(sample.ids, skip_special_tokens=True)
            rows.append({"completion": text, "extracted": prompts.extract_boxed(text),
                         "correct": prompts.grade(text, record["answer"]), "length": len(sample.ids)})
    return rows


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a cluster's time limit). While a training loop runs (`graceful`), the first
    lets the step finish and be saved before the run stops; the second, or any outside a loop, stops at once. A
    step that does not end within `base_grace` seconds + twice the longest step so far gets the second signal from
    a timer: a graceful stop never waits for ever (a row that takes minutes, a hung collective)."""

    def __init__(self):
        self.requested = False
        self.graceful = False
        self.saved = None
        self.longest_step = 0.0
        self.base_grace = 60.0

    def handle(self, signum, frame):
        if self.requested or not self.graceful:
            intact = f"checkpoint-{self.saved:06d} is intact" if self.saved else "no checkpoint was written yet"
            raise KeyboardInterrupt(f"stopped mid-step; {intact}" if self.graceful else "")
        self.requested = True
        grace = self.base_grace + 2 * self.longest_step
        timer = threading.Timer(grace, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        print(f"\n{signal.Signals(signum).name}: finishing this step (for at most {grace:.0f} s), then saving and "
              "stopping (again to stop now)", flush=True)


STOP = StopRequest()


class NonFinite(FloatingPointError):
    """A loss, gradient or weight that went nan or inf: the run stops before (or right after) the update that would
    spread it, its finished checkpoints intact. One line and exit status 3: a divergence, not a bug."""


def run_script(main):
    """The __main__ of every script: a user error (bad option, file, record or checkpoint, a full disk) is one line
    on stderr and exit status 2; a run that went non-finite one line and 3; Ctrl-C one line and 130. Anything else
    is a bug and keeps its traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, STOP.handle)
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFinite as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler for inductor on a CPU machine
        print(f"error: torch.compile failed here ({str(e).splitlines()[0][:200]}); run with --no-compile",
              file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr, flush=True)
        sys.exit(130)

"""
The run half of the library: what opsd.py, grpo.py, sft.py and eval.py share around their algorithm. It
imports lm.py (the model half) and prompts.py; no script imports another script.

  1. options: the shared option groups (each with help), presets (`--preset toy`: the CPU toy world), and
     the checks that reject a bad option or file before any model loads;
  2. distributed: torchrun's environment, NCCL on GPU and gloo on CPU (so it is testable here);
  3. data order: a fixed shuffled order per epoch, so the data position is just the step;
  4. optimizer: AdamW, linear warmup then cosine; one update per step, gradients averaged over ranks;
  5. the out dir and logging: one run per out dir (a lock, and no silent reuse), stdout + log.jsonl;
  6. checkpoints: the adapter (or full model), optimizer, schedule, RNG and the run's own settings, written
     atomically; --resume continues exactly, after checking that the same script and settings wrote it;
  7. the run: setup_run (2-6 in order, every check before the model loads), the periodic eval, the end of
     a step (checkpoint, Ctrl-C), finish. A script's main() reads: setup_run -> loop -> finish.
"""
import argparse
import fcntl
import fnmatch
import functools
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import sys

import torch
import torch.distributed as dist

import lm
import prompts
from prompts import UserError

# -----------------------------------------------------------------------------
# 1. options


def bounded(kind, low, high=None, low_open=False):
    """An argparse type: `kind` (int or float) in [low, high], or (low, high] with low_open."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if (value <= low if low_open else value < low) or (high is not None and value > high):
            interval = f"{'(' if low_open else '['}{low}, {'inf' if high is None else high}]"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value
    parse.__name__ = kind.__name__  # what argparse prints as the expected type
    return parse


positive_int, count = bounded(int, 1), bounded(int, 0)
fraction, positive_float, nonnegative = bounded(float, 0.0, 1.0), bounded(float, 0.0, low_open=True), bounded(float, 0.0)
probability = bounded(float, 0.0, 1.0, low_open=True)


LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear layer of a Qwen3 block (the paper's)


def model_options(parser, lora=True):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="Qwen/Qwen3-1.7B", help="HF id or local directory of the base model")
    if lora:
        group.add_argument("--lora-r", type=positive_int, default=64, help="LoRA rank")
        group.add_argument("--lora-alpha", type=positive_float, default=128, help="LoRA alpha")
        group.add_argument("--lora-dropout", type=fraction, default=0.0, help="LoRA dropout; 0 keeps the scored policy equal to the sampling one")
        group.add_argument("--lora-targets", default=LORA_TARGETS, help="comma-separated module names")
        group.add_argument("--full-finetune", action="store_true", help="train every weight instead of LoRA; a fixed or EMA teacher then keeps a full frozen copy (2x weight memory), and vLLM cannot sample")
        group.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (long sequences)")
    return group


def sampling_options(parser, temperature, max_new_tokens, gpu_memory):
    group = parser.add_argument_group("sampling")
    group.add_argument("--sampler", choices=["auto", "hf", "vllm"], default="auto", help="auto: vLLM on GPU when installed (and training LoRA), else HF generate")
    group.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help="rollout length limit")
    group.add_argument("--temperature", type=bounded(float, 0.0, 2.0), default=temperature, help="sampling temperature, 0 = greedy (vLLM rejects > 2); training also divides the logits in its loss by it")
    group.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling; < 1 truncates, so a loss's full softmax is no longer the sampling distribution")
    group.add_argument("--sampling-top-k", type=count, default=0, help="top-k sampling (0: off); truncates like --top-p")
    group.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=False, help="Qwen3 thinking mode in the chat template (--no-thinking: an empty <think></think> block)")
    group.add_argument("--vllm-gpu-memory", type=probability, default=gpu_memory, help="fraction of GPU memory vLLM may take (on CPU: of the NUMA node's memory; set VLLM_CPU_KVCACHE_SPACE too)")
    group.add_argument("--vllm-sleep", action=argparse.BooleanOptionalAction, default=True, help="on GPU, vLLM sleeps (level 1: weights to CPU, KV cache freed) while training runs, and wakes to sample")
    group.add_argument("--seed", type=count, default=0, help="seed for init, data order and sampling")
    return group


def training_parser(description, script, presets=None):
    """The options every training script shares, grouped; the script adds its own group. `presets`: the
    script's own named presets (name -> dict of option values) beside the toy world's."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)
    parser.presets = {**presets_for(script), **(presets or {})}
    parser.add_argument("--preset", choices=sorted(parser.presets), default=None,
                        help="named option values (toy: the CPU toy world, see toy.py); flags given on the command line still win, and --help shows the preset's values")
    model_options(parser)
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=prompts.TRAIN_DATA[0], help="HF dataset id, a prompts.BENCHMARKS key, or a local .jsonl/.json/.parquet")
    group.add_argument("--split", default=prompts.TRAIN_DATA[1], help="dataset split (HF ids)")
    group.add_argument("--max-problems", type=positive_int, default=None, help="use only the first N problems")
    group = parser.add_argument_group("optimization")
    group.add_argument("--lr", type=positive_float, default=2e-5, help="peak learning rate (AdamW)")
    group.add_argument("--warmup-ratio", type=fraction, default=0.1, help="linear warmup, as a fraction of all steps; cosine decay after")
    group.add_argument("--weight-decay", type=nonnegative, default=0.0, help="AdamW weight decay")
    group.add_argument("--batch-size", type=positive_int, default=32, help="problems per optimizer step, over all ranks")
    group.add_argument("--micro-batch-size", type=positive_int, default=4, help="sequences per forward pass on one rank (gradient accumulation)")
    group.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the data; used when --max-steps is not set")
    group.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    group.add_argument("--max-grad-norm", type=nonnegative, default=1.0, help="clip the gradient's global norm to this (0: no clipping)")
    group.add_argument("--chunk-size", type=positive_int, default=128, help="positions per chunk in the loss: its memory is ~12 fp32 chunk x vocab tensors (bench_loss.py)")
    sampling_options(parser, temperature=1.1, max_new_tokens=2048, gpu_memory=0.4)
    group = parser.add_argument_group("output and checkpoints")
    group.add_argument("--out-dir", default=f"runs/{script}", help="logs and checkpoints go here; it must be empty unless --resume continues the run in it, or --overwrite")
    group.add_argument("--overwrite", action="store_true", help="delete an earlier run's files (checkpoints, log) from --out-dir first")
    group.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N steps (and at the end)")
    group.add_argument("--keep", type=positive_int, default=2, help="checkpoints kept on disk (the newest)")
    group.add_argument("--stop-after", type=positive_int, default=None, help="save and exit after this step, keeping the --max-steps schedule (time-limited jobs; then --resume)")
    group.add_argument("--resume", default=None, help="a checkpoint dir, or an out dir (its latest checkpoint): continue exactly where it stopped")
    group.add_argument("--wandb", default=None, help="wandb project name (logged only if wandb is installed)")
    group = parser.add_argument_group("periodic eval")
    group.add_argument("--eval-every", type=count, default=0, help="evaluate every N steps and at the end (0: off); needs --eval-data")
    group.add_argument("--eval-data", default=None, help="problems for --eval-every: a local file or a prompts.BENCHMARKS key")
    group.add_argument("--eval-samples", type=positive_int, default=1, help="samples per problem for --eval-every")
    group.add_argument("--eval-temperature", type=bounded(float, 0.0, 2.0), default=0.0, help="temperature for --eval-every (0: greedy)")
    return parser


def parse_config(parser, argv=None):
    """Parse argv over the chosen preset over the defaults. The preset is applied before the real parse, so
    `--preset toy --help` shows the values the run will use."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(parser.presets), default=None)
    chosen, _ = first.parse_known_args(argv)
    if chosen.preset:
        parser.set_defaults(**parser.presets[chosen.preset])
    args = parser.parse_args(argv)
    check_options(args)
    return args


# The CPU toy world (toy.py builds it, under toy_cache/ or $OPSD_TOY_CACHE): every script's preset. LoRA r=16
# on the tiny model; lr 1e-3 with warmup (a fresh optimizer at a high lr and no warmup wrecks the warm start);
# rollouts are <= ~70 tokens; one micro-batch holds a whole step on CPU.
TOY_COMMON = dict(lora_r=16, lora_alpha=32, lr=1e-3, warmup_ratio=0.1, max_new_tokens=96, temperature=1.0, thinking=False,
                  micro_batch_size=32, chunk_size=4096, save_every=50, eval_every=50, eval_samples=1, eval_temperature=0.0,
                  sampler="hf")
TOY = {"opsd": dict(TOY_COMMON, batch_size=32, max_steps=150),
       "grpo": dict(TOY_COMMON, batch_size=4, group_size=8, max_steps=150, lr=3e-4),
       "sft": dict(TOY_COMMON, batch_size=32, max_steps=150),
       "eval": dict(samples=1, temperature=0.0, top_p=1.0, max_new_tokens=96, thinking=False, sampler="hf")}
TOY_SETTINGS = ("own", "expert")  # the style of the reference solutions (toy.py)


def toy_paths(setting="own", cache=None):
    cache = cache or os.environ.get("OPSD_TOY_CACHE") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_cache")
    root = os.path.join(cache, setting)
    return {name: os.path.join(root, file) for name, file in
            [("root", ""), ("base", "base"), ("warm", "warm"), ("train", "train.jsonl"), ("validation", "validation.jsonl"),
             ("test", "test.jsonl"), ("warmstart", "warmstart.jsonl")]}


def presets_for(script):
    """The toy world's presets for one script: `toy` (references in the student's own style) and `toy-expert`."""
    presets = {}
    for setting in TOY_SETTINGS:
        p = toy_paths(setting)
        name = "toy" if setting == "own" else f"toy-{setting}"
        presets[name] = dict(TOY[script], model=p["warm"], data=p["test"] if script == "eval" else p["train"], split=None,
                             out_dir=f"runs/{name}/{script}", **({} if script == "eval" else {"eval_data": p["test"]}))
    return presets


def check_model_path(path, option="--model"):
    # an HF id is "org/name"; anything else is a local directory, and a missing one must not reach
    # transformers, whose message for it is about repo id characters
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or os.path.exists(path) or path.startswith("."):
        if not os.path.isdir(path):
            raise UserError(f"{option} {path}: no such directory (and not a Hugging Face id like Qwen/Qwen3-1.7B)")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise UserError(f"{option} {path}: no config.json there (not a model directory)")


def check_options(args):
    """What argparse's types cannot see: options that only make sense together, and paths. Runs before any
    model loads, so a mistake costs a second, not a model load."""
    if getattr(args, "preset", None) and args.preset.startswith("toy") and not os.path.exists(os.path.join(args.model, "config.json")):
        setting = args.preset.partition("-")[2] or "own"
        raise UserError(f"--preset {args.preset}: no toy warm start at {args.model}; build it once with "
                        f"`python toy.py prepare --references {setting}` (about 5 minutes on 2 cores)")
    check_model_path(args.model)
    if "lm_head" in getattr(args, "lora_targets", "").split(","):
        raise UserError("--lora-targets: lm_head cannot carry an adapter here; the chunked loss multiplies by its base weight")
    if getattr(args, "eval_every", 0) and not args.eval_data:
        raise UserError("--eval-every needs --eval-data (the problems to evaluate on)")
    if getattr(args, "full_finetune", False) and args.sampler == "vllm":
        raise UserError("--sampler vllm needs LoRA: vLLM has no public API to load new full weights; use --sampler hf")


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a cluster's time limit). While a training loop runs (`graceful`), the first
    one lets the step finish and be saved before the run stops; the second, or any outside a training loop,
    stops at once."""

    def __init__(self):
        self.requested = self.graceful = False

    def handle(self, signum, frame):
        if self.requested or not self.graceful:
            raise KeyboardInterrupt("stopped mid-step; the last checkpoint is intact" if self.graceful else "")
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving and stopping (again to stop now)", flush=True)


STOP = StopRequest()


def run_script(main):
    """The __main__ of every script: a user error (bad option, file, record or checkpoint) is one line on
    stderr and exit status 2; Ctrl-C is one line and 130. Anything else is a bug, and keeps its traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, STOP.handle)
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr, flush=True)
        sys.exit(130)

# -----------------------------------------------------------------------------
# 2. distributed


def init_distributed():
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def sync_gradients(params, world):
    # plain data parallelism: one all-reduce of all trainable gradients per optimizer step. (DDP's wrapper
    # would need every forward to go through it; the teacher pass and the chunked head don't.)
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def gather(run, sums=None, means=None):
    """Floats (or 0-d device tensors) summed over ranks (counts: tokens, problems) or averaged (per-rank
    means over equal shares), in one all-reduce and one host sync: {name: float}."""
    sums, means = sums or {}, means or {}
    keys = list(sums) + list(means)
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=run.device).reshape(())
                          for v in list(sums.values()) + list(means.values())])
    if run.world > 1:
        dist.all_reduce(values)
        values[len(sums):] /= run.world
    return dict(zip(keys, values.tolist()))

# -----------------------------------------------------------------------------
# 3. data order: a fixed shuffled order per epoch, so the data position is just the step (resumable)


@functools.lru_cache(maxsize=2)
def epoch_order(n_records, seed, epoch):
    order = list(range(n_records))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def batch_indices(n_records, step, batch_size, seed, rank, world):
    """Indices of this rank's problems at a step: the global batch, split range(rank, B, world)."""
    out = []
    for i in range(rank, batch_size, world):
        position = step * batch_size + i
        out.append(epoch_order(n_records, seed, position // n_records)[position % n_records])
    return out

# -----------------------------------------------------------------------------
# 4. optimizer: AdamW, linear warmup then cosine decay; one update per step, averaged over ranks


def make_optimizer(args, params, total_steps):
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, int(args.warmup_ratio * total_steps))

    def schedule(step):  # linear warmup, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def optimizer_step(run, args, step, loss):
    """Average gradients over ranks, stop on a non-finite loss, clip, step. `loss`: this rank's summed loss
    (a float or a 0-d tensor). Returns (loss averaged over ranks, grad norm, lr used)."""
    sync_gradients(run.params, run.world)
    loss = gather(run, means={"loss": loss})["loss"]
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.max_grad_norm or float("inf")).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"step {step + 1}: loss {loss}, grad norm {grad_norm}: stopping before the update; "
                                 f"finished checkpoints in {args.out_dir} are intact")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, lr

# -----------------------------------------------------------------------------
# 5. the out dir and logging. One run per out dir: a second live run is refused (a lock), and so is a new
# run in a dir an earlier run wrote, unless it continues it (--resume) or replaces it (--overwrite)

# what our scripts write into an out dir; --overwrite deletes these and nothing else
RUN_FILES = ("checkpoint-*", "latest", "log.jsonl", "log.jsonl.tmp", "vllm_adapters", "samples*.jsonl",
             "samples.settings.json", "summary.json", ".lock")


def earlier_run(out_dir):
    """The entries of out_dir that an earlier run left (an empty log or the lock file do not count)."""
    if not os.path.isdir(out_dir):
        return []
    entries = sorted(os.listdir(out_dir))
    return [e for e in entries if e != ".lock" and not (e == "log.jsonl" and os.path.getsize(os.path.join(out_dir, e)) == 0)]


def claim_out_dir(out_dir, continuing, overwrite, master=True):
    """Apply the rule above (every rank), and on rank 0 lock out_dir for this run (the lock dies with the
    process, kill -9 included) and carry out --overwrite. Returns the open lock file (rank 0), to keep."""
    lock = None
    if master:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise UserError(f"--out-dir {out_dir}: another run is writing there (pid {lock.read().strip() or '?'})") from None
    left = earlier_run(out_dir)
    if left and overwrite:
        unknown = [e for e in left if not any(fnmatch.fnmatch(e, pattern) for pattern in RUN_FILES)]
        if unknown:
            raise UserError(f"--overwrite: {out_dir} holds files no run of ours wrote ({', '.join(unknown[:5])}); "
                            "clear it by hand or pick another --out-dir")
        for entry in left if master else []:
            path = os.path.join(out_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print0(f"--overwrite: deleted the earlier run in {out_dir}")
    elif left and not continuing:
        raise UserError(f"--out-dir {out_dir} holds an earlier run ({', '.join(left[:4])}{', ...' if len(left) > 4 else ''}); "
                        f"continue it with --resume {out_dir}, replace it with --overwrite, or pick another --out-dir")
    if master:
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
    return lock


class Logger:
    """One line per step to stdout, and one JSON object per step to out_dir/log.jsonl (rank 0)."""

    def __init__(self, args, master, resume_step=None):
        self.master, self.run, self.path = master, None, os.path.join(args.out_dir, "log.jsonl")
        if not master:
            return
        if resume_step is not None and os.path.exists(self.path):
            self.drop_after(resume_step)
        self.file = open(self.path, "a")
        if args.wandb:
            try:
                import wandb
                self.run = wandb.init(project=args.wandb, config=vars(args))
            except ImportError:
                print("--wandb given but wandb is not installed: logging to log.jsonl only")

    def log(self, record, line):
        if self.master:
            print(line, flush=True)
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.run:
                self.run.log(record, step=record["step"])

    def drop_after(self, step):
        """On resume: drop the records of steps after the checkpoint (they are about to run again), and a last
        line cut short by a crash, so log.jsonl holds each step once."""
        rows, _ = prompts.read_jsonl(self.path, torn_tail_ok=True)
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows if row["step"] <= step)
        os.replace(self.path + ".tmp", self.path)  # atomic: a crash here keeps the old log

# -----------------------------------------------------------------------------
# 6. checkpoints: the adapter (standard PEFT files, loadable by PeftModel.from_pretrained and vLLM's LoRARequest)
# or full model, plus optimizer, scheduler, step, per-rank RNG, and run.json (which script, which settings).
# Written to a temporary directory and renamed: a checkpoint is complete or absent, never half-written.

# settings a resumed run may change: where and how often it writes, how it is split into jobs, and speed knobs
# that leave the math unchanged; every other option must match the checkpoint's
RESUMABLE_CHANGES = {"resume", "stop_after", "out_dir", "overwrite", "wandb", "save_every", "keep", "eval_every",
                     "eval_data", "eval_samples", "eval_temperature", "micro_batch_size", "chunk_size", "sampler",
                     "vllm_gpu_memory", "vllm_sleep", "grad_checkpointing", "preset"}


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_step(path):
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete(path):
    return all(os.path.exists(os.path.join(path, f)) for f in ("run.json", "trainer_state.pt", "rng_rank0.pt"))


def save_checkpoint(run, args, step, extra):
    """Checkpoint `step` into args.out_dir, point `latest` at it, and delete older checkpoints beyond --keep.
    Only checkpoints of earlier steps are ever deleted, never the one just written."""
    out_dir, path = args.out_dir, os.path.join(args.out_dir, f"checkpoint-{step:06d}")
    tmp = path + ".tmp"
    if run.master:
        shutil.rmtree(tmp, ignore_errors=True)
        run.model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), **extra},
                   os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "run.json"), "w") as f:
            json.dump({"script": run.script, "step": step, "settings": vars(args)}, f, indent=1)
    if run.world > 1:
        dist.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{run.rank}.pt"))
    if run.world > 1:
        dist.barrier()
    if run.master:
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(path))
        os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))  # never an empty `latest`
        older = sorted(p for p in glob.glob(os.path.join(out_dir, "checkpoint-*[0-9]")) if checkpoint_step(p) < step)
        for old in older[:max(0, len(older) - (args.keep - 1))]:
            shutil.rmtree(old)
    if run.world > 1:
        dist.barrier()
    return path


def follow_latest(path, option="--resume"):
    """An out dir stands for its latest checkpoint (named in its `latest` file); anything else for itself. An
    empty or dangling `latest` (a crash, a copy) falls back to the newest complete checkpoint, with a note."""
    latest = os.path.join(path, "latest")
    if not os.path.exists(latest) and checkpoint_step(path) is not None:
        return path
    name = open(latest).read().strip() if os.path.exists(latest) else ""
    if name and is_complete(os.path.join(path, name)):
        return os.path.join(path, name)
    complete = sorted((p for p in glob.glob(os.path.join(path, "checkpoint-*[0-9]")) if is_complete(p)), key=checkpoint_step)
    if not complete:
        return path  # not an out dir with checkpoints: the caller says what is missing
    why = "has no `latest` file" if not os.path.exists(latest) else f"`latest` is empty" if not name else f"`latest` names {name}, which is missing or incomplete"
    print0(f"{option} {path}: {why}; using the newest complete checkpoint, {os.path.basename(complete[-1])}")
    return complete[-1]


def read_checkpoint(args, script):
    """--resume: find the checkpoint, check that this script wrote it with the same settings, and read its
    state, all before any model loads. Returns (path, trainer state, this rank's RNG state)."""
    path = follow_latest(args.resume)
    if not os.path.exists(os.path.join(path, "run.json")):
        raise UserError(f"--resume {args.resume}: no checkpoint there (no run.json; not a checkpoint dir, nor an out dir with one)")
    with open(os.path.join(path, "run.json")) as f:
        saved = json.load(f)
    if saved["script"] != script:
        raise UserError(f"--resume {path}: written by {saved['script']}.py, not {script}.py")
    changed = {k: (saved["settings"].get(k), v) for k, v in vars(args).items()
               if k not in RESUMABLE_CHANGES and saved["settings"].get(k) != v}
    if changed:
        raise UserError(f"--resume {path}: written with other settings: "
                        + "; ".join(f"--{k.replace('_', '-')} was {old!r}, now {new!r}" for k, (old, new) in changed.items()))
    states = []
    for file in ("trainer_state.pt", f"rng_rank{int(os.environ.get('RANK', 0))}.pt"):
        try:
            states.append(torch.load(os.path.join(path, file), map_location="cpu", weights_only=False))
        except Exception as e:  # a truncated or corrupt file: torch raises several kinds; all mean "unreadable"
            earlier = sorted((p for p in glob.glob(os.path.join(os.path.dirname(path), "checkpoint-*[0-9]"))
                              if is_complete(p) and checkpoint_step(p) < checkpoint_step(path)), key=checkpoint_step)
            offer = f"; resume from the one before it: --resume {earlier[-1]}" if earlier else ""
            raise UserError(f"--resume: {os.path.join(path, file)} is unreadable ({type(e).__name__}: {e}){offer}") from e
    return path, states[0], states[1]


def load_weights(path, model):
    from safetensors.torch import load_file
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors")))
    else:
        state = {}
        for file in glob.glob(os.path.join(path, "*.safetensors")):
            state.update(load_file(file))
        model.load_state_dict(state, strict=False)  # tied embeddings are saved once

# -----------------------------------------------------------------------------
# 7. the run


def setup_run(args, script, require, from_scratch=False, updates_per_step=1):
    """Stages 2-4 of every training script, with every check first: distributed init, data, the --resume
    checkpoint and the out dir (all before the model loads), then model + LoRA, optimizer and schedule, the
    log, and the resumed state. The schedule counts updates_per_step optimizer updates a step. Returns the run: rank, world, device, master, records, model, tokenizer,
    params, optimizer, scheduler, total_steps, start_step, state (what the script saved), logger."""
    rank, world, device = init_distributed()
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the number of ranks ({world})")
    records = prompts.load_records(args.data, args.split, require=require, limit=args.max_problems)
    eval_records = prompts.load_records(args.eval_data, None, require=("problem", "answer")) if args.eval_every else None
    checkpoint = read_checkpoint(args, script) if args.resume else None
    continuing = checkpoint is not None and os.path.abspath(os.path.dirname(checkpoint[0])) == os.path.abspath(args.out_dir)
    lock = claim_out_dir(args.out_dir, continuing, args.overwrite, master=rank == 0)
    if world > 1:
        dist.barrier()  # rank 0 has carried out --overwrite before anyone writes
    torch.manual_seed(args.seed)  # the same on every rank: identical LoRA init
    lora = None if args.full_finetune else dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                target_modules=args.lora_targets.split(","))
    model, tokenizer = lm.load_model(args.model, device, lora, from_scratch, args.grad_checkpointing)
    params = lm.trainable_parameters(model)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(records) / args.batch_size))
    optimizer, scheduler = make_optimizer(args, params, total_steps * updates_per_step)
    run = argparse.Namespace(script=script, rank=rank, world=world, device=device, master=rank == 0, records=records,
                             eval_records=eval_records, model=model, tokenizer=tokenizer, params=params, optimizer=optimizer,
                             scheduler=scheduler, total_steps=total_steps, start_step=0, state={}, lock=lock, last_saved=None)
    if checkpoint:
        path, run.state, rng = checkpoint
        if continuing:  # later checkpoints belong to the abandoned continuation, as do their log lines
            for later in glob.glob(os.path.join(args.out_dir, "checkpoint-*[0-9]")):
                if rank == 0 and checkpoint_step(later) > run.state["step"]:
                    print0(f"--resume: deleting {later}, written after the resumed step")
                    shutil.rmtree(later)
        load_weights(path, model)
        optimizer.load_state_dict(run.state["optimizer"])
        scheduler.load_state_dict(run.state["scheduler"])
        set_rng_state(rng)
        run.start_step = run.last_saved = run.state["step"]
        print0(f"resumed from {path} at step {run.start_step}")
    else:
        torch.manual_seed(args.seed + 1 + rank)  # from here on, each rank samples differently
        random.seed(args.seed + 1 + rank)
    run.logger = Logger(args, rank == 0, run.start_step if checkpoint else None)
    STOP.requested, STOP.graceful = False, True
    print0(f"{script}: writing to {os.path.abspath(args.out_dir)} (log.jsonl, checkpoint-NNNNNN)")
    return run


def make_run_sampler(run, args):
    return lm.make_sampler(args.sampler, model=run.model, tokenizer=run.tokenizer, model_path=args.model, device=run.device,
                           lora_rank=None if args.full_finetune else args.lora_r, seed=args.seed,
                           vllm_gpu_memory=args.vllm_gpu_memory, adapter_dir=os.path.join(args.out_dir, "vllm_adapters", f"rank{run.rank}"),
                           rank=run.rank, world=run.world, vllm_sleep=args.vllm_sleep)


def eval_due(args, step, total_steps):
    return args.eval_every > 0 and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps)


def evaluate(run, args, sampler, step):
    """The periodic eval: --eval-samples per --eval-data problem from the current weights, logged as a record."""
    sampler.update(run.model, step)
    summary = lm.run_eval(run.tokenizer, run.eval_records, sampler, n=args.eval_samples, temperature=args.eval_temperature,
                          max_new_tokens=args.max_new_tokens, thinking=args.thinking, rank=run.rank, world=run.world)
    run.logger.log({"step": step, "eval": summary}, f"eval at step {step}: avg {summary['avg']:.4f} over {summary['problems']} problems")
    return summary


def end_step(run, args, step, extra_state, stop=False):
    """After a step's update, log and eval: the checkpoint every --save-every steps, at the end, at --stop-after,
    when Ctrl-C asked to stop, and when the script says `stop`. True when the loop stops here."""
    requested = torch.tensor(float(STOP.requested), device=run.device)
    if run.world > 1:
        dist.all_reduce(requested, op=dist.ReduceOp.MAX)  # every rank stops after the same step
    interrupted, last = bool(requested.item()), step + 1 == run.total_steps
    stop = stop or interrupted or step + 1 == args.stop_after
    if (step + 1) % args.save_every == 0 or last or stop:
        save_checkpoint(run, args, step + 1, extra_state)
        run.last_saved = step + 1
    run.interrupted = interrupted
    return stop


def finish(run, args, sampler):
    """Shut the sampler down (vLLM needs the process group still alive), then the process group; say where the
    run is. A run stopped by Ctrl-C ends as interrupted (exit 130), its step saved."""
    if sampler is not None:
        sampler.close()
    STOP.graceful = False
    if run.world > 1 and dist.is_initialized():  # (a vLLM engine's teardown may have destroyed it already)
        dist.destroy_process_group()
    where = f"latest checkpoint {os.path.join(args.out_dir, f'checkpoint-{run.last_saved:06d}')}" if run.last_saved else "no checkpoint"
    print0(f"{run.script}: log {os.path.join(args.out_dir, 'log.jsonl')}, {where}")
    if getattr(run, "interrupted", False):
        raise KeyboardInterrupt(f"stopped after step {run.last_saved}; continue with --resume {args.out_dir}")

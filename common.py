"""
The run plumbing that opsd.py, sft.py and grpo.py share, so each script keeps only its algorithm:
torchrun helpers (NCCL on GPU, gloo on CPU), the optimizer and its schedule, the update step, logging,
checkpoints and exact resume, and the end of a step (periodic eval, then the checkpoint).

Read opsd.py first: opsd.setup_run calls init_distributed, make_optimizer and Logger, then main() calls
resume_run, and per step optimizer_step, Logger.log and end_step. Nothing here knows about OPSD, GRPO or SFT.
"""
import glob
import json
import math
import os
import random
import shutil

import torch
import torch.distributed as dist

import prompts

# -----------------------------------------------------------------------------
# 1. distributed: torchrun's environment; NCCL on GPU, gloo on CPU (so it is testable here)


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


def all_reduce_mean(values, world):
    """Average a flat tensor over ranks (in place)."""
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return values


def sync_gradients(params, world):
    # plain data parallelism: one all-reduce of all trainable gradients per optimizer step. (DDP's
    # wrapper would need every forward to go through it; the teacher pass and the chunked head don't.)
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_mean(torch.cat([g.flatten() for g in grads]), world)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def gather_metrics(run, values):
    """Mean over ranks of a dict of floats."""
    keys = sorted(values)
    reduced = all_reduce_mean(torch.tensor([float(values[k]) for k in keys], device=run.device, dtype=torch.float64), run.world)
    return dict(zip(keys, reduced.tolist()))

# -----------------------------------------------------------------------------
# 2. optimizer: AdamW, linear warmup then cosine decay; one update per step, averaged over ranks


def make_optimizer(args, params, total_steps):
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, int(args.warmup_ratio * total_steps))

    def schedule(step):  # linear warmup, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def total_steps(args, n_records):
    return args.max_steps or max(1, math.ceil(args.epochs * n_records / args.batch_size))


def optimizer_step(run, args, step, loss):
    """Average gradients over ranks, stop on a non-finite loss, clip, step. Returns (loss, grad norm, lr used)."""
    sync_gradients(run.params, run.world)
    loss = all_reduce_mean(torch.tensor([float(loss)], device=run.device), run.world).item()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.grad_clip if args.grad_clip > 0 else float("inf")).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"step {step + 1}: loss {loss}, grad norm {grad_norm}: stopping before the update; "
                                 f"finished checkpoints in {args.out_dir} are intact")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, lr

# -----------------------------------------------------------------------------
# 3. logging: stdout, out_dir/log.jsonl, and wandb when asked for


class Logger:
    """One line per step to stdout, and one JSON object per step to out_dir/log.jsonl (rank 0)."""

    def __init__(self, args, master):
        self.master, self.run = master, None
        if master:
            os.makedirs(args.out_dir, exist_ok=True)
            self.file = open(os.path.join(args.out_dir, "log.jsonl"), "a")
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
        """On resume: drop the records of steps after the checkpoint (they are about to run again), and
        a last line cut short by a crash, so log.jsonl holds each step once."""
        if self.master:
            self.file.close()
            with open(self.file.name) as f:
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
            with open(self.file.name + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.file.name + ".tmp", self.file.name)  # atomic: a crash here keeps the old log
            self.file = open(self.file.name, "a")

# -----------------------------------------------------------------------------
# 4. checkpoints: the adapter (standard PEFT files, loadable by PeftModel.from_pretrained and vLLM's
# LoRARequest) or full model, plus optimizer, scheduler, step, per-rank RNG; written to a temporary
# directory and renamed, so a finished checkpoint is never half-overwritten


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


def save_checkpoint(out_dir, step, model, tokenizer, optimizer, scheduler, extra, rank, world, keep=2):
    path = os.path.join(out_dir, f"checkpoint-{step:06d}")
    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **extra},
                   os.path.join(tmp, "trainer_state.pt"))
    if world > 1:
        dist.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        with open(os.path.join(out_dir, "latest"), "w") as f:
            f.write(os.path.basename(path))
        for old in sorted(glob.glob(os.path.join(out_dir, "checkpoint-*[0-9]")))[:-keep]:
            shutil.rmtree(old)
    if world > 1:
        dist.barrier()
    return path


def follow_latest(path):
    """An out dir stands for its latest checkpoint (the name in its `latest` file); anything else for itself."""
    latest = os.path.join(path, "latest")
    return os.path.join(path, open(latest).read().strip()) if os.path.exists(latest) else path


def resolve_checkpoint(path):
    path = follow_latest(path)
    if not os.path.exists(os.path.join(path, "trainer_state.pt")):
        raise FileNotFoundError(f"--resume {path}: no trainer_state.pt there (not a checkpoint, nor an out dir with one)")
    return path


def load_checkpoint(path, model, optimizer, scheduler, rank):
    """Restore weights, optimizer, scheduler and this rank's RNG; return the saved trainer state."""
    from safetensors.torch import load_file
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors")))
    else:
        state = {}
        for file in glob.glob(os.path.join(path, "*.safetensors")):
            state.update(load_file(file))
        model.load_state_dict(state, strict=False)  # tied embeddings are saved once
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    set_rng_state(torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=False))
    return trainer_state


def resume_run(run, args):
    """--resume: weights, optimizer, schedule and RNG as they were; returns (start step, saved trainer state)."""
    if not args.resume:
        return 0, {}
    state = load_checkpoint(resolve_checkpoint(args.resume), run.model, run.optimizer, run.scheduler, run.rank)
    run.logger.drop_after(state["step"])
    print0(f"resumed from {args.resume} at step {state['step']}")
    return state["step"], state

# -----------------------------------------------------------------------------
# 5. the end of a step: eval every --eval-every steps, then the checkpoint


def end_step(run, args, step, sampler, extra_state):
    """After a step's update and log line: eval.run_eval every --eval-every steps and at the end (on
    --eval-data), then the checkpoint. True when the run stops here (--stop-after)."""
    last, stop = step + 1 == run.total_steps, step + 1 == args.stop_after
    if sampler and args.eval_every and args.eval_data and ((step + 1) % args.eval_every == 0 or last):
        from eval import run_eval  # imported here: eval.py imports opsd.py, which imports this file
        sampler.update(run.model, step + 1)
        records = prompts.load_records(args.eval_data, None, require=("problem", "answer"))
        evaluation = run_eval(run.model, run.tokenizer, records, sampler, n=args.eval_samples, temperature=args.eval_temperature,
                              top_p=1.0, max_new_tokens=args.max_new_tokens, thinking=args.thinking, rank=run.rank, world=run.world)
        run.logger.log({"step": step + 1, "eval": evaluation}, f"eval at step {step + 1}: {json.dumps(evaluation)}")
    if (step + 1) % args.save_every == 0 or last or stop:
        save_checkpoint(args.out_dir, step + 1, run.model, run.tokenizer, run.optimizer, run.scheduler, extra_state,
                        run.rank, run.world, args.keep)
    return stop

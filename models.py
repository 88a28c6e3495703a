"""
The model and its parts, as every script loads them: the base model (with a fresh LoRA adapter, or every weight
trained), an external teacher (frozen), the attention kernel, and the transformer body and LM head the chunked losses
compute from. A shared building block of opsd.py, grpo.py, sft.py and eval.py: the part of a step a reader can skip.
"""
import importlib.util

import torch

import plumbing


def attention(device):
    if device.type == "cuda" and importlib.util.find_spec("flash_attn"):  # only a GPU install that built it has it
        return "flash_attention_2"
    return "sdpa"


def load_model(path, device, dtype=torch.float32, lora=None, from_scratch=False, grad_checkpointing=False):
    """(model, tokenizer). `lora`: peft.LoraConfig fields for a fresh adapter, or None to train every weight. A LoRA
    run's frozen base is stored in `dtype`; weights that train are fp32 (the adapter: PEFT keeps it so; a full
    model: its fp32 weights are the master copy bf16 autocast computes from, so a small update is never rounded
    away). Returned in eval mode: the loop switches to train mode for the student pass only."""
    from transformers import AutoConfig, AutoModelForCausalLM
    options = dict(dtype=torch.float32 if lora is None else dtype, attn_implementation=attention(device))
    if from_scratch:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), **options)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **options)
    model.to(device)
    if grad_checkpointing:  # acts in train mode only (transformers' rule): the student pass
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    model.eval()
    return model, plumbing.load_tokenizer(path)


def load_teacher(path, device, dtype):
    """--teacher-model: a frozen model in `dtype` (nothing of it trains), in eval mode."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention(device))
    model.to(device)
    model.requires_grad_(False)
    return model.eval()


def lora_config(args):
    if args.full_finetune:
        return None
    return dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                target_modules=args.lora_targets.split(","))


def lm_parts(model):
    """(transformer body, lm_head weight) of a plain or PEFT-wrapped causal LM."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.model, model.lm_head.weight

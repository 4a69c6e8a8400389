"""Shared fixtures: the real default model, loaded once per session per dtype."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine import EngineConfig, LoadedModel

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_fp32() -> LoadedModel:
    return LoadedModel.load(EngineConfig(dtype="float32"))


@pytest.fixture(scope="session")
def model_bf16() -> LoadedModel:
    return LoadedModel.load(EngineConfig(dtype="bfloat16"))


@pytest.fixture(scope="session")
def hf_fp32(model_fp32: LoadedModel):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_fp32.source.path, dtype=torch.float32).eval()


def make_prompts(tokenizer, lengths: list[int]) -> list[list[int]]:
    """Distinct natural-text prompts cut to exact token counts."""
    topics = ["the history of Rome", "how bread rises", "the tides", "prime numbers",
              "a cat on a boat", "writing a parser", "mountain weather", "the printing press"]
    prompts = []
    for i, n in enumerate(lengths):
        topic = topics[i % len(topics)]
        text = " ".join(
            f"Paragraph {k} about {topic}: people have studied {topic} for a long time, and "
            f"each generation adds notes, questions and small discoveries of its own."
            for k in range(n // 20 + 2)
        )
        ids = tokenizer(text)["input_ids"]
        assert len(ids) >= n
        prompts.append(ids[:n])
    return prompts

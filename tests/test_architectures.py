"""Each supported architecture against transformers, on tiny randomly initialised checkpoints."""

import shutil

import pytest
import torch

from splitserve.engine import EngineConfig, LLMEngine, LoadedModel, SamplingParams
from splitserve.engine.models.llama import UnsupportedModel

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.15, rms_norm_eps=1e-6)


def configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return {
        "llama3": LlamaConfig(**COMMON, rope_parameters=llama3_rope, tie_word_embeddings=False),
        "llama-tied": LlamaConfig(**COMMON, tie_word_embeddings=True),
        "mistral": MistralConfig(**COMMON, sliding_window=None),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=False),
        "qwen3": Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
    }


def save_tiny(config, folder, tokenizer_source):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    for f in tokenizer_source.glob("tokenizer*"):
        shutil.copy(f, folder)
    return model


@pytest.mark.parametrize("name", list(configs()))
def test_architecture_matches_transformers(name, tmp_path, model_fp32):
    hf = save_tiny(configs()[name], tmp_path, model_fp32.source.path)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_bytes=8 << 20,
                                    block_size=8))
    assert engine.loaded.spec.architecture == hf.config.architectures[0]
    prompts = [[(7 * i + 3) % 500 for i in range(n)] for n in (5, 19, 70)]
    ours = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=12, min_new_tokens=12, eos_token_id=None, pad_token_id=0)
        assert out == ref[0, len(prompt):].tolist()


def test_sliding_window_caps_the_context(tmp_path, model_fp32):
    from transformers import MistralConfig

    save_tiny(MistralConfig(**COMMON, sliding_window=128), tmp_path, model_fp32.source.path)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_bytes=8 << 20))
    assert engine.max_model_len == 128
    with pytest.raises(ValueError, match="context of 128"):
        engine.add_request("r", list(range(100)), SamplingParams(max_new_tokens=29))


def test_unsupported_architecture_names_the_supported_ones(tmp_path, model_fp32):
    from transformers import GPT2Config

    save_tiny(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128), tmp_path, model_fp32.source.path)
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LoadedModel.load(EngineConfig(model=str(tmp_path)))

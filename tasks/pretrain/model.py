"""Decoder-only causal LM presets (Llama architecture), built from scratch or loaded from a folder."""

from __future__ import annotations

from typing import Literal

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

Preset = Literal["tiny", "mini", "small", "base"]

# Sizes chosen for where they run: `tiny` trains in seconds on one CPU thread (tests), `mini` in
# a minute or two (the demo: enough to learn the shapes of the self-instruct prompts), `small` in
# tens of minutes on a laptop CPU, `base` (~110M) wants a GPU.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "mini": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4),
}


def build_model(preset: str, tokenizer: PreTrainedTokenizerBase, max_positions: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model whose vocabulary and special ids match `tokenizer`."""
    import torch

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **PRESETS[preset],
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())

"""The same weights in Hugging Face transformers' LlamaForCausalLM: the reference we test against.

transformers is a test/bench extra, imported only here.
"""

from __future__ import annotations

import torch

from pie.engine.loaders import LoadedModel


def hf_model(loaded: LoadedModel, dtype: torch.dtype = torch.float32):
    """A LlamaForCausalLM (sdpa attention, eval mode) holding `loaded`'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**loaded.config.to_hf(), attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {name: w.to(dtype) for name, w in loaded.weights.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.to(dtype).eval()

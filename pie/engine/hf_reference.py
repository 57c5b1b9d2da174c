"""The same weights in Hugging Face transformers (LlamaForCausalLM, Gemma3ForCausalLM, ...):
the reference we test against.

transformers is a test/bench extra, imported only here.
"""

from __future__ import annotations

import torch

from pie.engine.llama import HF_FAMILIES
from pie.engine.loaders import LoadedModel


def hf_model(loaded: LoadedModel, dtype: torch.dtype = torch.float32):
    """The family's *ForCausalLM (eval mode) holding `loaded`'s weights."""
    import transformers

    hf = loaded.config.to_hf() | {"pad_token_id": None}  # the padding row does not matter here
    model_class = getattr(transformers, HF_FAMILIES[loaded.config.model_type])
    # sdpa where transformers has it; Gemma 2's soft-capped attention is eager only
    attention = "eager" if hf["model_type"] == "gemma2" else "sdpa"
    config = model_class.config_class(**hf, attn_implementation=attention)
    with torch.device("meta"):
        model = model_class(config)
    state = {name: w.to(dtype) for name, w in loaded.weights.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=config)
    if hasattr(inner.embed_tokens, "embed_scale"):  # a non-persistent buffer, left on meta
        inner.embed_tokens.embed_scale = torch.tensor(config.hidden_size**0.5)
    return model.to(dtype).eval()

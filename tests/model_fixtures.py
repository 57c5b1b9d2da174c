"""Tiny random Llama models for the model tests, and the Hugging Face reference to compare with.

A model is written the way users have them (config.json + model.safetensors +
tokenizer.json) and loaded back through pie's own loader, so the tests cover
the loader as well as the forward pass.
"""

from __future__ import annotations

import glob
import os

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from pie.engine.hf_reference import hf_model
from pie.engine.loaders import LoadedModel, load_model

SPECIALS = ["<|im_start|>", "<|im_end|>"]


def write_byte_tokenizer(folder: str) -> None:
    """A byte-level BPE tokenizer.json: 256 byte tokens, a few merges, two special tokens."""
    from pie.engine.tokenizer import BYTE_LEVEL

    alphabet = sorted(BYTE_LEVEL, key=BYTE_LEVEL.get)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "th")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = HFTokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    backend.save(os.path.join(folder, "tokenizer.json"))


def write_tiny_model(folder: str, *, seed: int = 0, architecture: str = "llama", **overrides):
    """A random LlamaForCausalLM (or Qwen2/Qwen3/Mistral/Gemma3ForCausalLM) saved with
    save_pretrained, plus a tokenizer; returns the transformers model."""
    import transformers

    from pie.engine.llama import HF_FAMILIES

    model_class = getattr(transformers, HF_FAMILIES[architecture])
    config_class = model_class.config_class
    settings = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.25,  # large weights: sharp attention, so mask mistakes show
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**settings))
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; randomise them too
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma applies (1 + w): centre its weights on 0
                p.uniform_(-0.5, 0.5) if architecture == "gemma3_text" else p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(folder)
    assert glob.glob(os.path.join(folder, "*.safetensors"))
    return model.eval()


def tiny_model(folder: str, **overrides) -> tuple[LoadedModel, object]:
    """(our LoadedModel, the HF reference model on the same weights), both fp32."""
    write_tiny_model(folder, **overrides)
    loaded = load_model(folder, dtype="float32")
    return loaded, hf_model(loaded)


def hf_probs(reference, tokens: list[int], positions: list[int] | None = None) -> torch.Tensor:
    """Softmax of the reference model's logits at every position of one sequence."""
    ids = torch.tensor([tokens])
    kwargs = {}
    if positions is not None:
        kwargs["position_ids"] = torch.tensor([positions])
    with torch.no_grad():
        logits = reference(ids, **kwargs).logits[0]
    return torch.softmax(logits.float(), dim=-1)


def dense(distribution: tuple[list[int], list[float]], vocab_size: int) -> torch.Tensor:
    """A full probability vector from a (ids, probs) distribution."""
    ids, probs = distribution
    out = torch.zeros(vocab_size)
    out[torch.tensor(ids)] = torch.tensor(probs)
    return out


def model_path() -> str | None:
    try:
        from pie.service.registry import default_model_path

        return default_model_path()
    except Exception:
        return None


_worker: list = []


def shared_worker():
    """SmolLM2 in float32, loaded on first use and shared by the test modules of a run.

    float32, not the CPU's `auto` choice: the app and endpoint tests check what
    is done with the text a model writes, and greedy text in bf16 differs between
    CPUs with and without AVX512-BF16 (low-precision numerics are tested by
    tolerance in test_model_smollm2).
    """
    if not _worker:
        from pie.service.local import load_worker

        _worker.append(load_worker(model_path(), dtype="float32"))
    return _worker[0]

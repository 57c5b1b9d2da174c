"""Tiny random Llama models for the model tests, and the Hugging Face reference to compare with.

A model is written the way users have them (config.json + model.safetensors +
tokenizer.json) and loaded back through pie's own loader, so the tests cover
the loader as well as the forward pass.
"""

from __future__ import annotations

import glob
import os

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
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
                p.uniform_(-0.5, 0.5) if architecture.startswith("gemma") else p.uniform_(0.5, 1.5)
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


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's Q/K row interleaving for llama.cpp's RoPE."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


GGUF_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Gemma 2: four norms per block, written by llama.cpp's converter as 1 + w
GEMMA2_GGUF_PARTS = GGUF_PARTS | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


# bytes per K-quant super-block of 256, and where its fp16 super-block scales lie
K_BLOCKS = {Q.Q4_K: (144, slice(0, 4)), Q.Q5_K: (176, slice(0, 4)), Q.Q6_K: (210, slice(208, 210))}


def random_k_quant(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """K-quant blocks for a [rows, cols] weight: random quants and sub-block scales, small fp16
    super-block scales (gguf has no K-quant quantizer to make them from weights)."""
    size, scales = K_BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)
    d = rng.uniform(0.001, 0.01, size=(blocks.shape[0], (scales.stop - scales.start) // 2))
    blocks[:, scales] = d.astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // 256 * size)


def random_q4_k(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return random_k_quant(Q.Q4_K, rows, cols, seed)


def write_gguf(
    path: str, source: LoadedModel, arch: str = "llama", mlp: Q | dict[str, Q] = Q.Q4_1
) -> None:
    """The safetensors model `source` as llama.cpp's converter writes it for `arch`
    ("llama" or "gemma2"): F32 norms/embeddings/attention, the MLP in `mlp` (or per part:
    {"mlp.gate_proj": ..., ...}): quantized from the weights (Q4_1, Q5_0, Q8_0) or
    K-quants (random blocks in place of the weights)."""
    c, tok = source.config, source.tokenizer
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "gemma2":
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
        writer.add_sliding_window(c.sliding_window)
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if vocab[t] in tok.special_ids else 1 for t in tokens])
    writer.add_token_merges(["t h", "th e", "Ġ th"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    parts = GEMMA2_GGUF_PARTS if arch == "gemma2" else GGUF_PARTS
    for name, w in source.weights.items():
        array = w.float().numpy()
        if arch == "gemma2" and name.endswith("norm.weight"):
            array = array + 1.0
        if name in names:
            writer.add_tensor(names[name], array)
            continue
        layer, part = name.split(".")[2], ".".join(name.split(".")[3:-1])
        target = f"blk.{layer}.{parts[part]}.weight"
        if arch == "llama" and part == "self_attn.q_proj":
            array = permute(array, c.num_attention_heads)
        elif arch == "llama" and part == "self_attn.k_proj":
            array = permute(array, c.num_key_value_heads)
        qtype = mlp.get(part, Q.Q4_1) if isinstance(mlp, dict) else mlp
        if part.startswith("mlp.") and qtype in K_BLOCKS:
            blocks = random_k_quant(qtype, *array.shape, seed=len(target))
            writer.add_tensor(target, blocks, raw_dtype=qtype)
        elif part.startswith("mlp."):
            writer.add_tensor(target, quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(target, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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

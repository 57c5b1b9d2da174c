"""GGUF files (llama.cpp's format), read with the `gguf` package and dequantized.

Linear weights stored as Q4_1 or Q4_K are also kept in block form so that the
CPU int4 kernel can use them losslessly (pie.engine.quant), and Q8_0, Q5_0, Q5_K
and Q6_K tensors as int8 groups (pie.engine.quant.Int8Groups: the embedding read by
rows, linears by pie.engine.cpu_kernels), also losslessly; every tensor is also
dequantized by gguf.quants into a dense copy (the only form of F16, BF16, Q4_0, ...). Q and K rows are un-permuted:
convert_hf_to_gguf interleaves them for llama.cpp's pair-wise RoPE (Llama
only), while our RoPE (like Hugging Face's) rotates halves. Gemma's RMSNorm
weights are stored by the converter as 1 + w; we hand the model Hugging
Face's w.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from zope.interface import implementer

from pie.engine.llama import LlamaConfig
from pie.engine.loaders import DTYPES, LoadedModel, model_name_for
from pie.engine.quant import (
    Int8Groups,
    Q4_1Weight,
    parse_q4_1,
    parse_q4_k,
    parse_q5_0,
    parse_q5_k,
    parse_q6_k,
    parse_q8_0,
)
from pie.engine.tokenizer import Tokenizer
from pie.interfaces import IModelLoader, PieError

GGUF_MAGIC = b"GGUF"
EMBEDDING = "model.embed_tokens.weight"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
PERMUTED_QK = ("llama",)  # architectures whose converter interleaves Q/K rows
QK_NAMES = ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")
NORM_PLUS_ONE = ("gemma2", "gemma3")  # converter wrote norm weights as 1 + w
GEMMA3_SLIDING_PATTERN = 6  # llama.cpp: every 6th Gemma 3 layer is global
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's rope_freq_base_train_swa for Gemma 3

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma 2 and 3: four norms per block; their ffn_norm is the pre-MLP norm
GEMMA3_LAYER_NAMES = LAYER_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face tensor name of a GGUF tensor (None: not a weight we use)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    names = GEMMA3_LAYER_NAMES if arch in NORM_PLUS_ONE else LAYER_NAMES
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in names:
        if parts[3] in ("weight", "bias"):
            return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    return None


def unpermute_order(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K interleaving (rows of one head: pairs -> halves)."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)


def read_metadata(reader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items()}


def config_from_metadata(
    meta: dict, rope_freqs: np.ndarray | None, vocab_size: int, tied_head: bool, name: str
) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise PieError(
            f"GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def key(suffix: str, default=None):
        value = meta.get(f"{arch}.{suffix}", default)
        if value is None:
            raise PieError(f"GGUF metadata lacks {arch}.{suffix}")
        return value

    hidden = key("embedding_length")
    heads = key("attention.head_count")
    rope_scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if rope_freqs is not None:  # Llama 3.1+: per-frequency divisors stored as a tensor
        rope_scaling = {"rope_type": "freq_factors", "factors": rope_freqs.tolist()}
    elif scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    elif scaling_type not in (None, "none"):
        raise PieError(f"GGUF rope scaling {scaling_type!r} is not supported")
    layers = key("block_count")
    head_dim = meta.get(f"{arch}.attention.key_length") or hidden // heads
    family: dict = {"model_type": arch, "qk_norm": arch == "qwen3"}
    if arch in ("gemma2", "gemma3"):
        gemma2 = arch == "gemma2"
        # llama.cpp: Gemma 2 alternates local and global layers, Gemma 3 has one global in six
        pattern = 2 if gemma2 else GEMMA3_SLIDING_PATTERN
        family = dict(
            model_type="gemma2" if gemma2 else "gemma3_text",
            hidden_act="gelu_pytorch_tanh",
            qk_norm=not gemma2,
            sandwich_norm=True,
            norm_offset=1.0,
            embed_scale=hidden**0.5,
            # llama.cpp: 1/sqrt(hidden/heads) for the 27B models (46 layers in Gemma 2,
            # 62 in Gemma 3), 1/sqrt(head_dim) otherwise
            query_pre_attn_scalar=hidden // heads if layers in (46, 62) else head_dim,
            sliding_window=key("attention.sliding_window"),
            layer_types=tuple(
                "sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(layers)
            ),
            rope_local_theta=None if gemma2 else GEMMA3_LOCAL_ROPE_BASE,
            final_logit_softcapping=meta.get(f"{arch}.final_logit_softcapping"),
            attn_logit_softcapping=meta.get(f"{arch}.attn_logit_softcapping"),
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=key("context_length", 2048),
        tie_word_embeddings=tied_head,
        name=name,
        **family,
    )


@implementer(IModelLoader)
class GGUFLoader:
    formatName = "gguf"

    def can_load(self, path: str) -> bool:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC

    def load(self, path: str, device: str, dtype: str) -> LoadedModel:
        from gguf import GGMLQuantizationType, GGUFReader
        from gguf.quants import dequantize

        # tensor types the int4 kernel runs as they are (the rest become dense copies)
        int4_forms = {GGMLQuantizationType.Q4_1: parse_q4_1, GGMLQuantizationType.Q4_K: parse_q4_k}
        # and those kept as int8 groups (exact too)
        group_forms = {
            GGMLQuantizationType.Q8_0: parse_q8_0,
            GGMLQuantizationType.Q5_0: parse_q5_0,
            GGMLQuantizationType.Q5_K: parse_q5_k,
            GGMLQuantizationType.Q6_K: parse_q6_k,
        }

        try:
            reader = GGUFReader(path)
        except (ValueError, OSError) as e:
            raise PieError(f"cannot read GGUF file {path}: {e}") from None
        meta = read_metadata(reader)
        tensors = {t.name: t for t in reader.tensors}
        rope_freqs = None
        if "rope_freqs.weight" in tensors:
            rope_freqs = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32)
        name = model_name_for(path)
        if "token_embd.weight" not in tensors:
            raise PieError(f"{path} has no token_embd.weight tensor")
        vocab_size = int(tensors["token_embd.weight"].shape[1])  # ggml order: [hidden, vocab]
        config = config_from_metadata(
            meta, rope_freqs, vocab_size, "output.weight" not in tensors, name
        )
        tokenizer = Tokenizer.from_gguf_metadata(meta)
        target = DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype
        weights: dict[str, torch.Tensor] = {}
        quantized: dict[str, Q4_1Weight] = {}
        rows: dict[str, Int8Groups] = {}
        arch = meta.get("general.architecture")
        permuted = arch in PERMUTED_QK
        for gname, t in tensors.items():
            name_hf = hf_name(gname, arch)
            if name_hf is None:
                continue
            array = dequantize(t.data, t.tensor_type)
            if not array.flags.writeable:  # F32 tensors come straight from the mmap
                array = array.copy()
            if arch in NORM_PLUS_ONE and name_hf.endswith("norm.weight"):
                array = array - 1.0
            order = None
            if permuted and name_hf.endswith(QK_NAMES):
                heads = (
                    config.num_attention_heads
                    if "q_proj" in name_hf
                    else config.num_key_value_heads
                )
                order = unpermute_order(array.shape[0], heads)
                array = array[order]
            weights[name_hf] = torch.from_numpy(np.ascontiguousarray(array)).to(target)
            if array.ndim != 2:
                continue
            for forms, kept in ((int4_forms, quantized), (group_forms, rows)):
                parse = forms.get(t.tensor_type)
                if parse is not None:
                    q = parse(t.data, array.shape[0], array.shape[1])
                    kept[name_hf] = q if order is None else q.permute_rows(order)
        return LoadedModel(
            name=name,
            path=path,
            format=self.formatName,
            config=config,
            weights=weights,
            tokenizer=tokenizer,
            quantized=quantized,
            rows=rows,
        )

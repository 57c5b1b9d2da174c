"""The Llama-family decoder (Llama 2/3, SmolLM2, ...) over a paged KV cache.

Pre-norm blocks: x += o(attn(rmsnorm(x))); x += down(silu(gate(h)) * up(h)).
Tokens of every item of a batch are flattened into one [N, hidden] matrix so
each projection is one matmul for the whole batch; only attention looks at
items separately (pie.engine.attention). The arithmetic follows Hugging Face's
LlamaForCausalLM operation for operation (fp32 RMSNorm, fp32 RoPE tables cast
to the model dtype, rotate-half RoPE), which is what lets tests compare logits
at fp32 precision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from pie.engine.attention import AttentionPlan, attend
from pie.engine.kv_cache import KvCache
from pie.engine.quant import (
    DenseLinear,
    Int4Linear,
    Int4OrDenseLinear,
    Q4_1Weight,
    int4_supported,
)
from pie.interfaces import PieError

Linear = DenseLinear | Int4OrDenseLinear


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters, named as in Hugging Face's LlamaConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    name: str = "llama"
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_hf(cls, d: dict, name: str = "llama") -> LlamaConfig:
        """From a Hugging Face config.json dict."""
        heads = d["num_attention_heads"]
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        params = d.get("rope_parameters")  # transformers 5 style
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        if d.get("use_sliding_window"):
            raise PieError("sliding-window attention is not supported")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta or 10000.0,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            name=name,
        )

    def to_hf(self) -> dict:
        """A Hugging Face config.json dict for the same architecture."""
        d = asdict(self)
        for key in ("name", "extra"):
            d.pop(key)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu")
        if self.rope_scaling is None:
            d.pop("rope_scaling")
        return d


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies, with the model's own rope scaling ('llama3', 'linear' or none)."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    )
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "freq_factors":  # GGUF rope_freqs tensor: per-frequency divisors
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        old_context = scaling.get("original_max_position_embeddings", 8192)
        low_wavelen = old_context / low
        high_wavelen = old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise PieError(f"rope scaling type {kind!r} is not supported (default, linear, llama3 are)")


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin [N, 1, dim] for explicit positions, in fp32 per call as HF does.

    No table indexed by position: positions may have gaps and be large. The
    sin table carries rotate-half's minus sign on its first half, so a layer's
    RoPE is roll + 2 mul + add (same values as HF: negation is exact).
    """
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    half = freqs.shape[-1]
    sin = emb.sin()
    sin[:, :half] = -sin[:, :half]
    return emb.cos().to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, dim] (rotate-half convention, as HF; tables from rope_tables)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm (fp32 statistics); torch's fused kernel, bit-identical in fp32."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@dataclass
class LlamaLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear


class LlamaModel:
    """Weights on one device plus the forward pass; stateless apart from the KV cache it is given.

    `weights` use Hugging Face names (model.layers.N.self_attn.q_proj.weight, ...),
    as float tensors; `quantized` optionally holds Q4_1 forms of the linear weights
    under the same names, used when `use_int4` (CPU + bf16 by default).
    """

    def __init__(
        self,
        config: LlamaConfig,
        weights: dict[str, torch.Tensor],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        quantized: dict[str, Q4_1Weight] | None = None,
        use_int4: bool | None = None,
    ):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        quantized = quantized or {}
        if use_int4 is None:
            use_int4 = bool(quantized) and int4_supported(self.device, dtype)
        self.int4 = use_int4 and bool(quantized)
        missing = [n for n in self.expected_weight_names() if n not in weights]
        if missing:
            raise PieError(f"model weights are missing {len(missing)} tensors, e.g. {missing[:3]}")

        def tensor(name: str) -> torch.Tensor:
            return weights[name].to(device=self.device, dtype=dtype).contiguous()

        def linear(*names: str) -> Linear:
            biases = [n.removesuffix(".weight") + ".bias" for n in names]
            present = [b in weights for b in biases]
            if any(present) and not all(present):
                raise PieError(f"biases of {names} are only partly present")
            bias = torch.cat([tensor(b) for b in biases]) if all(present) else None
            dense = DenseLinear(torch.cat([tensor(n) for n in names]), bias)
            if self.int4 and all(n in quantized for n in names):
                q4 = Int4Linear(Q4_1Weight.concat([quantized[n] for n in names]), dtype)
                return Int4OrDenseLinear(q4, dense)
            return dense

        self.embed = tensor("model.embed_tokens.weight")
        self.norm = tensor("model.norm.weight")
        if "lm_head.weight" in weights:
            self.lm_head = tensor("lm_head.weight")
        else:
            self.lm_head = self.embed  # tied head
        self.layers: list[LlamaLayer] = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            self.layers.append(
                LlamaLayer(
                    input_norm=tensor(p + "input_layernorm.weight"),
                    post_norm=tensor(p + "post_attention_layernorm.weight"),
                    qkv=linear(
                        attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"
                    ),
                    o=linear(attn + "o_proj.weight"),
                    gate_up=linear(mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                    down=linear(mlp + "down_proj.weight"),
                )
            )
        self.inv_freq = rope_inv_freq(config).to(self.device)

    def expected_weight_names(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        return names

    def new_kv_cache(self, num_pages: int, page_size: int) -> KvCache:
        c = self.config
        return KvCache(
            num_layers=c.num_hidden_layers,
            num_pages=num_pages,
            page_size=page_size,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            device=self.device,
            dtype=self.dtype,
        )

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[tokens]

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        plan: AttentionPlan,
        cache: KvCache,
        output_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Run N new tokens (flattened over items); write their K/V; return logits of output_rows.

        tokens, positions: [N] int64 on the device; plan: where each item's
        context lives and who attends to what; output_rows: [R] row indices.
        Returns [R, vocab] logits in the model dtype.
        """
        c = self.config
        n = tokens.shape[0]
        hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_size, kv_size = hq * hd, hkv * hd
        cos, sin = rope_tables(self.inv_freq, positions, self.dtype)
        x = self.embed[tokens]
        eps = c.rms_norm_eps
        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, eps)
            qkv = layer.qkv(h)
            qk = apply_rope(qkv[:, : q_size + kv_size].view(n, hq + hkv, hd), cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
            v = qkv[:, q_size + kv_size :].view(n, hkv, hd)
            cache.write(index, plan.write_slots, k, v)
            attn = attend(q, cache, index, plan)
            x = x + layer.o(attn.reshape(n, q_size))
            h = rms_norm(x, layer.post_norm, eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        if output_rows.numel() == 0:
            return x.new_empty(0, c.vocab_size)
        x = rms_norm(x[output_rows], self.norm, eps)
        return F.linear(x, self.lm_head)

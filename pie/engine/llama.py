"""The Llama-family decoder (Llama 2/3, SmolLM2, Qwen2/3, Mistral, Gemma 3) over a paged KV cache.

Pre-norm blocks: x += o(attn(rmsnorm(x))); x += down(silu(gate(h)) * up(h)).
Families differ by a few switches in LlamaConfig, set from the checkpoint's
model_type (from_hf) or GGUF architecture (loaders.gguf_loader):

- Qwen3 and Gemma 3 RMS-normalise each head of q and k before RoPE (qk_norm);
- Gemma 3 also normalises the attention and MLP outputs before they join the
  residual ("sandwich" norms), stores RMSNorm weights as w applied as (1 + w)
  (norm_offset), scales embeddings by sqrt(hidden), uses GeGLU with tanh GELU,
  a query scale of query_pre_attn_scalar**-0.5, and interleaves local layers
  (sliding window, their own RoPE base) with global ones (layer_types).
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

from pie.engine import cpu_kernels
from pie.engine.attention import AttentionPlan, attend
from pie.engine.cpu_decode import FusedDecode
from pie.engine.kv_cache import KvCache
from pie.engine.quant import (
    DenseLinear,
    Int4Linear,
    Int4OrDenseLinear,
    Int8GroupLinear,
    Int8Groups,
    Q4_1Weight,
    int4_kernel_name,
    int4_supported,
    quantized_head,
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
    model_type: str = "llama"  # Hugging Face model_type of the family
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma)
    qk_norm: bool = False
    sandwich_norm: bool = False
    norm_offset: float = 0.0  # Gemma: RMSNorm multiplies by (norm_offset + w)
    embed_scale: float | None = None  # Gemma: sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # attention scale is this**-0.5 (default head_dim)
    sliding_window: int | None = None  # local layers see positions p - window < q <= p
    layer_types: tuple[str, ...] | None = None  # "sliding_attention" | "full_attention" per layer
    rope_local_theta: float | None = None  # RoPE base of sliding layers (default rope_theta)
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    extra: dict = field(default_factory=dict, compare=False)

    def is_sliding(self, layer: int) -> bool:
        return (
            self.sliding_window is not None
            and self.layer_types is not None
            and self.layer_types[layer] == "sliding_attention"
        )

    @classmethod
    def from_hf(cls, d: dict, name: str = "llama") -> LlamaConfig:
        """From a Hugging Face config.json dict (Llama, Mistral, Qwen2/3, Gemma 2, Gemma 3 text)."""
        model_type = d.get("model_type", "llama")
        if model_type == "gemma3":  # the multimodal wrapper: its text half
            d = {**d["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        if model_type not in HF_FAMILIES:
            raise PieError(
                f"model_type {model_type!r} is not supported ({', '.join(sorted(HF_FAMILIES))} are)"
            )
        heads = d["num_attention_heads"]
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        local_theta = d.get("rope_local_base_freq")
        params = d.get("rope_parameters")  # transformers 5 style
        if isinstance(params, dict) and "full_attention" in params:  # per layer type (Gemma 3)
            local_theta = params.get("sliding_attention", {}).get("rope_theta", local_theta)
            params = params["full_attention"]
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        sliding_window = layer_types = None
        gemma = model_type in GEMMA
        partial = (params or {}).get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise PieError(f"partial rotary embeddings ({partial}) are not supported")
        if gemma:
            sliding_window = d.get("sliding_window", 4096)
            # Gemma 2 alternates local and global layers; Gemma 3 has one global in six
            pattern = d.get("sliding_window_pattern", 2 if model_type == "gemma2" else 6)
            layer_types = tuple(
                d.get("layer_types")
                or [
                    "sliding_attention" if (i + 1) % pattern else "full_attention"
                    for i in range(d["num_hidden_layers"])
                ]
            )
        elif model_type in ("mistral", "phi3") and d.get("sliding_window") is not None:
            sliding_window = d["sliding_window"]
            layer_types = ("sliding_attention",) * d["num_hidden_layers"]
        elif d.get("use_sliding_window"):
            raise PieError(f"sliding-window attention of {model_type} is not supported")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta or (1_000_000.0 if gemma else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            name=name,
            model_type=model_type,
            hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "silu",
            qk_norm=model_type in ("qwen3", "gemma3_text"),  # Gemma 2 soft-caps instead
            sandwich_norm=gemma,
            norm_offset=1.0 if gemma else 0.0,
            embed_scale=d["hidden_size"] ** 0.5 if gemma else None,
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256) if gemma else None,
            sliding_window=sliding_window,
            layer_types=layer_types,
            rope_local_theta=(local_theta or 10000.0) if model_type == "gemma3_text" else None,
            final_logit_softcapping=d.get("final_logit_softcapping"),
            attn_logit_softcapping=d.get("attn_logit_softcapping") if gemma else None,
        )

    def to_hf(self) -> dict:
        """A Hugging Face config.json dict for the same architecture."""
        d = asdict(self)
        for key in ("name", "extra", "model_type", "qk_norm", "sandwich_norm", "norm_offset"):
            d.pop(key)
        for key in ("embed_scale", "rope_local_theta"):
            d.pop(key)
        architecture = HF_FAMILIES[self.model_type]
        d.update(model_type=self.model_type, architectures=[architecture])
        if self.model_type == "gemma3_text":
            d["hidden_activation"] = d.pop("hidden_act")
            d["layer_types"] = list(self.layer_types)
            d["rope_parameters"] = {
                "full_attention": {"rope_type": "default", **(self.rope_scaling or {})},
                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_theta},
            }
            d["rope_parameters"]["full_attention"]["rope_theta"] = self.rope_theta
            d.pop("rope_scaling")
            d.pop("rope_theta")
            d.pop("attn_logit_softcapping")
            return d
        if self.model_type == "gemma2":
            d["hidden_activation"] = d.pop("hidden_act")
            d["layer_types"] = list(self.layer_types)
            if self.rope_scaling is None:
                d.pop("rope_scaling")
            return d
        for key in (
            "query_pre_attn_scalar",
            "layer_types",
            "final_logit_softcapping",
            "attn_logit_softcapping",
        ):
            d.pop(key)
        if self.sliding_window is None:
            d.pop("sliding_window")
        if self.rope_scaling is None:
            d.pop("rope_scaling")
        elif self.model_type == "phi3":  # Phi3Config overrides the dict's with its own field
            original = self.rope_scaling.get("original_max_position_embeddings")
            d["original_max_position_embeddings"] = original or self.max_position_embeddings
        return d


# Hugging Face model_type -> the transformers class with the same arithmetic
HF_FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
GEMMA = ("gemma2", "gemma3_text")  # (1 + w) norms, sandwich norms, scaled embeddings, GeGLU
FUSED = {"phi3"}  # checkpoints with qkv_proj and gate_up_proj


def rope_inv_freq(config: LlamaConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies, with the model's own rope scaling ('llama3', 'linear' or none).

    local: those of the sliding-window layers (Gemma 3: their own base, no scaling).
    """
    dim = config.head_dim
    base = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = {} if local and config.rope_local_theta else (config.rope_scaling or {})
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
    if kind == "yarn":
        return _yarn_inv_freq(config, base, scaling)
    if kind == "longrope":  # the short factors; rope_long_inv_freq has the long ones
        return inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float32)
    raise PieError(
        f"rope scaling type {kind!r} is not supported (default, linear, llama3, yarn are)"
    )


def rope_long_inv_freq(config: LlamaConfig) -> tuple[torch.Tensor, int] | None:
    """LongRoPE's long-context frequencies and the length past which they apply (else None).

    As transformers does, a forward pass whose largest position reaches past
    original_max_position_embeddings uses the long factors for all its tokens.
    """
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "longrope":
        return None
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    )
    long = inv_freq / torch.tensor(scaling["long_factor"], dtype=torch.float32)
    return long, scaling["original_max_position_embeddings"]


def rope_attention_factor(config: LlamaConfig) -> float:
    """YaRN's and LongRoPE's factor on cos and sin (1 for the other scalings), as transformers."""
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(config, scaling)
    if kind == "longrope":
        original = scaling["original_max_position_embeddings"]
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    return mscale(factor)


def _yarn_factor(config: LlamaConfig, scaling: dict) -> float:
    factor = scaling.get("factor")
    if factor is None:  # Phi-3: from the two lengths
        factor = config.max_position_embeddings / scaling["original_max_position_embeddings"]
    return factor


def _yarn_inv_freq(config: LlamaConfig, base: float, scaling: dict) -> torch.Tensor:
    """YaRN: interpolate low frequencies, extrapolate high ones, a linear ramp between."""
    dim = config.head_dim
    factor = _yarn_factor(config, scaling)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin [N, 1, dim] for explicit positions, in fp32 per call as HF does.

    No table indexed by position: positions may have gaps and be large. The
    sin table carries rotate-half's minus sign on its first half, so a layer's
    RoPE is roll + 2 mul + add (same values as HF: negation is exact).
    """
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    half = freqs.shape[-1]
    cos, sin = emb.cos(), emb.sin()
    if factor != 1.0:  # YaRN's attention factor, on both tables as transformers applies it
        cos, sin = cos * factor, sin * factor
    sin[:, :half] = -sin[:, :half]
    return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, dim] (rotate-half convention, as HF; tables from rope_tables)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm (fp32 statistics); torch's fused kernel, bit-identical in fp32."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@dataclass
class LlamaLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor  # before the MLP
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    qk_norm: torch.Tensor | None = None  # [q heads + kv heads, head_dim]: q's weight, then k's
    attn_out_norm: torch.Tensor | None = None  # sandwich norms (Gemma)
    mlp_out_norm: torch.Tensor | None = None
    sliding: bool = False


def held_storages(root: object, *, dense_copies: bool = True) -> dict[int, int]:
    """data pointer -> bytes of each tensor storage reachable from `root` through attributes,
    lists, tuples and dicts; dense_copies=False skips `Int4OrDenseLinear.dense`."""
    found: dict[int, int] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, Int4OrDenseLinear) and not dense_copies:
            stack.append(obj.int4)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return found


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class LlamaModel:
    """Weights on one device plus the forward pass; stateless apart from the KV cache it is given.

    `weights` use Hugging Face names (model.layers.N.self_attn.q_proj.weight, ...),
    as float tensors; `quantized` optionally holds Q4_1 forms of the linear weights
    under the same names, used when `use_int4` (CPU + bf16 by default); `rows` int8-group
    forms (the embedding, read by rows; linears, run by cpu_kernels where it is available).
    """

    def __init__(
        self,
        config: LlamaConfig,
        weights: dict[str, torch.Tensor],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        quantized: dict[str, Q4_1Weight] | None = None,
        rows: dict[str, Int8Groups] | None = None,
        use_int4: bool | None = None,
        dense_dtype: torch.dtype | None = None,
    ):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        # the dense copies that int4 layers use for many rows (pie.engine.cpu_path)
        self.dense_dtype = dense_dtype or dtype
        quantized = quantized or {}
        groups = rows or {}
        if use_int4 is None:
            use_int4 = bool(quantized) and int4_supported(self.device, dtype)
        self.int4 = use_int4 and bool(quantized)
        missing = [n for n in self.expected_weight_names() if n not in weights]
        if missing:
            raise PieError(f"model weights are missing {len(missing)} tensors, e.g. {missing[:3]}")

        def tensor(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor:
            return weights[name].to(device=self.device, dtype=as_dtype).contiguous()

        def linear(*names: str) -> Linear:
            biases = [n.removesuffix(".weight") + ".bias" for n in names]
            present = [b in weights for b in biases]
            if any(present) and not all(present):
                raise PieError(f"biases of {names} are only partly present")
            bias = torch.cat([tensor(b) for b in biases]) if all(present) else None
            # Q4_1/Q4_K parts: torch's int4 kernel; parts with any 8-bit format: all of them as
            # int8 groups (Q4_1/Q4_K are that form exactly: q 0..15, d and m per 32), one call
            parts = [quantized.get(n, groups.get(n)) for n in names]
            few: Int4Linear | Int8GroupLinear | None = None
            if self.int4 and all(isinstance(part, Q4_1Weight) for part in parts):
                few = Int4Linear(Q4_1Weight.concat(parts), torch.bfloat16)
            elif self.int4 and all(p is not None for p in parts) and cpu_kernels.available():
                few = Int8GroupLinear(
                    Int8Groups.concat(
                        [p if isinstance(p, Int8Groups) else Int8Groups.from_q4_1(p) for p in parts]
                    )
                )
            if few is None:
                return DenseLinear(torch.cat([tensor(n) for n in names]), bias)
            dense = DenseLinear(torch.cat([tensor(n, self.dense_dtype) for n in names]), bias)
            return Int4OrDenseLinear(few, dense)

        def norm(name: str) -> torch.Tensor:
            return (weights[name].float() + config.norm_offset).to(self.device, dtype).contiguous()

        if config.hidden_act not in ACTIVATIONS:
            raise PieError(f"activation {config.hidden_act!r} is not supported")
        self.act = ACTIVATIONS[config.hidden_act]
        fused = config.model_type in FUSED
        embedding = "model.embed_tokens.weight"
        # int4 layers with a separate dense head copy read the exact embedding only by rows
        # (lookup, rescored logits): kept as the file's int8 groups where it has them (Int8Groups)
        q8 = groups.get(embedding) if self.int4 and self.dense_dtype != dtype else None
        self.embed: torch.Tensor | Int8Groups = (
            tensor(embedding) if q8 is None else q8.to(self.device, dtype)
        )
        self.embed_scale = (
            None
            if config.embed_scale is None
            else torch.tensor(config.embed_scale, dtype=dtype, device=self.device)
        )
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.norm = norm("model.norm.weight")
        head_name = "lm_head.weight" if "lm_head.weight" in weights else None
        self.lm_head = tensor(head_name) if head_name else self.embed  # else tied
        self.head: Linear
        if not self.int4:
            self.head = DenseLinear(self.lm_head)
        else:
            # The head reads more bytes than any layer (vocab x hidden): quantize it for
            # decode too, from the file's Q4_1 blocks or by rounding the float weight to
            # Q4_1, its top logits rescored; the embedding lookup keeps the exact weight.
            dense_head = self.lm_head
            if self.dense_dtype != dtype:
                dense_head = tensor(head_name or embedding, self.dense_dtype)
            source = weights[embedding] if q8 is not None and not head_name else self.lm_head
            self.head = quantized_head(
                source, quantized.get(head_name or ""), dense_head, exact=self.lm_head
            )
        self.layers: list[LlamaLayer] = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            qk_norm = attn_out_norm = mlp_out_norm = None
            if config.qk_norm:
                heads_q, heads_kv = config.num_attention_heads, config.num_key_value_heads
                qk_norm = torch.cat(
                    [
                        norm(attn + "q_norm.weight")[None].expand(heads_q, -1),
                        norm(attn + "k_norm.weight")[None].expand(heads_kv, -1),
                    ]
                ).contiguous()
            if config.sandwich_norm:
                attn_out_norm = norm(p + "post_attention_layernorm.weight")
                mlp_out_norm = norm(p + "post_feedforward_layernorm.weight")
                pre_mlp = norm(p + "pre_feedforward_layernorm.weight")
            else:
                pre_mlp = norm(p + "post_attention_layernorm.weight")
            self.layers.append(
                LlamaLayer(
                    input_norm=norm(p + "input_layernorm.weight"),
                    post_norm=pre_mlp,
                    qkv=linear(attn + "qkv_proj.weight")
                    if fused
                    else linear(
                        attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"
                    ),
                    o=linear(attn + "o_proj.weight"),
                    gate_up=linear(mlp + "gate_up_proj.weight")
                    if fused
                    else linear(mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                    down=linear(mlp + "down_proj.weight"),
                    qk_norm=qk_norm,
                    attn_out_norm=attn_out_norm,
                    mlp_out_norm=mlp_out_norm,
                    sliding=config.is_sliding(i),
                )
            )
        self.inv_freq = rope_inv_freq(config).to(self.device)
        self.rope_factor = rope_attention_factor(config)
        self.long_rope = rope_long_inv_freq(config)
        if self.long_rope is not None:
            self.long_rope = (self.long_rope[0].to(self.device), self.long_rope[1])
        self.local_inv_freq = None
        if config.rope_local_theta and any(layer.sliding for layer in self.layers):
            self.local_inv_freq = rope_inv_freq(config, local=True).to(self.device)
        # batch-1 decode in one compiled call (None: this model or machine cannot)
        self.fused = FusedDecode.build(self) if self.int4 else None

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the tensors the model holds, each storage once (a tied head counts once):
        "weights" all of them; "dense_copies" the part only the many-row dense GEMMs use
        (the copies an int4 layer keeps beside its packed form, pie.engine.quant)."""
        everything = held_storages(self)
        without = held_storages(self, dense_copies=False)
        return {
            "weights": sum(everything.values()),
            "dense_copies": sum(everything.values()) - sum(without.values()),
        }

    def path_description(self) -> dict[str, str]:
        """dtype, the kernel of few-row linears (and the head), the many-row GEMM's dtype, and
        whether decode steps of few sequences are the fused call (pie.engine.cpu_decode)."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "weight_kernel": int4_kernel_name() if self.int4 else "dense",
            "head": int4_kernel_name() if isinstance(self.head, Int4OrDenseLinear) else "dense",
            "dense_dtype": str(self.dense_dtype).removeprefix("torch."),
            "decode_step": "fused" if self.fused is not None else "layers",
        }

    def expected_weight_names(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            if self.config.model_type in FUSED:
                names += [p + "self_attn.qkv_proj.weight", p + "self_attn.o_proj.weight"]
                names += [p + "mlp.gate_up_proj.weight", p + "mlp.down_proj.weight"]
                continue
            names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
            if self.config.qk_norm:
                names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
            if self.config.sandwich_norm:
                names += [p + f"{x}_feedforward_layernorm.weight" for x in ("pre", "post")]
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
        x = self.embed[tokens]
        return x if self.embed_scale is None else x * self.embed_scale

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        plan: AttentionPlan,
        cache: KvCache,
        output_rows: torch.Tensor,
        local_plan: AttentionPlan | None = None,
    ) -> torch.Tensor:
        """Run N new tokens (flattened over items); write their K/V; return logits of output_rows.

        tokens, positions: [N] int64 on the device; plan: where each item's
        context lives and who attends to what; local_plan: the same with the
        sliding window applied, for the sliding layers (None: no item reaches
        past the window, plan serves them too); output_rows: [R] row indices.
        Returns [R, vocab] logits in the model dtype.
        """
        c = self.config
        n = tokens.shape[0]
        hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_size, kv_size = hq * hd, hkv * hd
        inv_freq = self.inv_freq
        if self.long_rope is not None and int(positions.max()) + 1 > self.long_rope[1]:
            inv_freq = self.long_rope[0]
        cos, sin = rope_tables(inv_freq, positions, self.dtype, self.rope_factor)
        local_cos, local_sin = cos, sin
        if self.local_inv_freq is not None:
            local_cos, local_sin = rope_tables(self.local_inv_freq, positions, self.dtype)
        x = self.embed_tokens(tokens)
        eps = c.rms_norm_eps
        fused = None
        if self.fused is not None and plan.decode_all:
            fused = self.fused.step(x, plan, local_plan, cos, sin, local_cos, local_sin, cache)
        for index, layer in enumerate(self.layers if fused is None else ()):
            h = rms_norm(x, layer.input_norm, eps)
            qkv = layer.qkv(h)
            qk = qkv[:, : q_size + kv_size].view(n, hq + hkv, hd)
            if layer.qk_norm is not None:
                qk = F.rms_norm(qk, (hd,), None, eps) * layer.qk_norm
            if layer.sliding:
                qk = apply_rope(qk, local_cos, local_sin)
            else:
                qk = apply_rope(qk, cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
            v = qkv[:, q_size + kv_size :].view(n, hkv, hd)
            cache.write(index, plan.write_slots, k, v)
            layer_plan = local_plan if layer.sliding and local_plan is not None else plan
            attn = attend(q, cache, index, layer_plan, self.scale, c.attn_logit_softcapping)
            h = layer.o(attn.reshape(n, q_size))
            if layer.attn_out_norm is not None:
                h = rms_norm(h, layer.attn_out_norm, eps)
            x = x + h
            h = rms_norm(x, layer.post_norm, eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            h = layer.down(self.act(gate) * up)
            if layer.mlp_out_norm is not None:
                h = rms_norm(h, layer.mlp_out_norm, eps)
            x = x + h
        if fused is not None:
            x = fused
        if output_rows.numel() == 0:
            return x.new_empty(0, c.vocab_size)
        x = rms_norm(x[output_rows], self.norm, eps)
        logits = self.head(x)
        if c.final_logit_softcapping:
            cap = c.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

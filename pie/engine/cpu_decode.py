"""A decode step of up to 10 sequences in one compiled call (pie_decode_step, cpu_kernels.c).

Why: a few sequences decoding on a CPU is what llama.cpp is best at, and there a layer of
the torch path is ~45 small ops around four weight reads whose dispatch costs about as
much as streaming the weights (bench/decode_step.py's skeleton: 8x faster fused). The
step runs every layer of the new tokens in one OpenMP team: the same math in float32 on
the same quantized weights (pie's int4 and int8-group kernels, each weight row read once
per 8 sequences with AVX512), the K/V written into the paged cache, attention over each
item's pages with its mask (and, on sliding layers, the window's).

`FusedDecode.build(model)` says whether a model can take it (CPU, float32, every linear
on pie's kernels, no soft-capping); `step` is called by LlamaModel.forward and returns
None for a forward it does not take (any prefill item, or more than MAX_ITEMS items).
"""

from __future__ import annotations

import ctypes

import torch

from pie.engine import cpu_kernels
from pie.engine.attention import AttentionPlan
from pie.engine.kv_cache import KvCache
from pie.engine.quant import Int4Linear, Int4OrDenseLinear, Int8GroupLinear

INT4, INT8, INT4X8 = 0, 1, 2
ACTS = {"silu": 0, "gelu_pytorch_tanh": 1}
MAX_HEAD_DIM = 512  # the C side's RoPE scratch
# past this many items the layer loop's many-row GEMMs (oneDNN, bf16 where native) win
MAX_ITEMS = Int4OrDenseLinear.MAX_INT4_ROWS


class Linear(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int),
        ("N", ctypes.c_int),
        ("K", ctypes.c_int),
        ("gs", ctypes.c_int),
        ("q", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


class Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", Linear),
        ("o", Linear),
        ("gate_up", Linear),
        ("down", Linear),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qk_norm", ctypes.c_void_p),
        ("attn_out_norm", ctypes.c_void_p),
        ("mlp_out_norm", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("sliding", ctypes.c_int),
    ]


class Model(ctypes.Structure):
    _fields_ = [
        ("L", ctypes.c_int),
        ("H", ctypes.c_int),
        ("hq", ctypes.c_int),
        ("hkv", ctypes.c_int),
        ("hd", ctypes.c_int),
        ("inter", ctypes.c_int),
        ("act", ctypes.c_int),
        ("head_stride", ctypes.c_long),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("layers", ctypes.POINTER(Layer)),
    ]


class Step(ctypes.Structure):
    _fields_ = [
        ("B", ctypes.c_int),
        ("P", ctypes.c_int),
        ("pages", ctypes.c_void_p),
        ("page_size", ctypes.c_int),
        ("write_slots", ctypes.c_void_p),
        ("lens", ctypes.c_void_p),
        ("local_lens", ctypes.c_void_p),
        ("mask", ctypes.c_void_p),
        ("local_mask", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("local_cos", ctypes.c_void_p),
        ("local_sin", ctypes.c_void_p),
    ]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear(lin: object) -> tuple[Linear, list[torch.Tensor]] | None:
    """The C descriptor of a few-row linear on pie's kernels (and the tensors it points to)."""
    if not isinstance(lin, Int4OrDenseLinear):
        return None
    few, bias = lin.int4, lin.dense.bias
    keep = [] if bias is None else [bias.float().contiguous()]
    b = keep[0].data_ptr() if keep else None
    if isinstance(few, Int4Linear) and few.fp32 is not None:
        p = few.fp32
        kind = INT4X8 if p.x8 else INT4
        desc = Linear(
            kind, p.out_features, p.in_features, 32, _ptr(p.packed), _ptr(p.d), _ptr(p.m), b
        )
        return desc, keep + [p.packed, p.d, p.m]
    if isinstance(few, Int8GroupLinear):
        p = few.packed
        mins = None if few.mins is None else few.mins.T.contiguous()  # [N, K/g]
        keep += [p.q, p.scales] + ([] if mins is None else [mins])
        desc = Linear(
            INT8, p.out_features, p.in_features, p.group, _ptr(p.q), _ptr(p.scales), _ptr(mins), b
        )
        return desc, keep
    return None


class FusedDecode:
    """The model's weights as pie_decode_step's descriptors; the cache's pointers per cache."""

    def __init__(self, model, layers: list[Layer], keep: list[torch.Tensor]):
        self.model = model
        self._layers = (Layer * len(layers))(*layers)
        self._keep = keep  # the tensors the descriptors point into
        c = model.config
        self._struct = Model(
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            layers[0].gate_up.N // 2,
            ACTS[c.hidden_act],
            0,
            c.rms_norm_eps,
            model.scale,
            self._layers,
        )
        self._cache: KvCache | None = None
        self.steps = 0  # steps taken (the tests count them)

    @staticmethod
    def build(model) -> FusedDecode | None:
        """The fused step for `model`, or None where it cannot run it."""
        c = model.config
        lib = cpu_kernels.library()
        if (
            lib is None
            or model.device.type != "cpu"
            or model.dtype != torch.float32
            or c.attn_logit_softcapping
            or c.hidden_act not in ACTS
            or c.head_dim > MAX_HEAD_DIM
            or c.num_attention_heads % c.num_key_value_heads
        ):
            return None
        layers, keep = [], []
        for layer in model.layers:
            parts = [_linear(x) for x in (layer.qkv, layer.o, layer.gate_up, layer.down)]
            if any(p is None for p in parts):
                return None
            for _, tensors in parts:
                keep += tensors
            layers.append(
                Layer(
                    *(desc for desc, _ in parts),
                    _ptr(layer.input_norm),
                    _ptr(layer.post_norm),
                    _ptr(layer.qk_norm),
                    _ptr(layer.attn_out_norm),
                    _ptr(layer.mlp_out_norm),
                    None,
                    None,
                    int(layer.sliding),
                )
            )
        return FusedDecode(model, layers, keep)

    def _attach(self, cache: KvCache) -> None:
        """Point the layers at this cache's K/V (float32, [layers, heads, pages, size, dim])."""
        if cache.k.dtype != torch.float32 or not cache.k.is_contiguous():
            raise ValueError("the fused decode step needs a contiguous float32 KV cache")
        for i in range(len(self._layers)):
            self._layers[i].k = cache.k[i].data_ptr()
            self._layers[i].v = cache.v[i].data_ptr()
        _, _, pages, size, dim = cache.k.shape
        self._struct.head_stride = pages * size * dim
        self._cache = cache

    def step(
        self,
        x: torch.Tensor,
        plan: AttentionPlan,
        local_plan: AttentionPlan | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        local_cos: torch.Tensor,
        local_sin: torch.Tensor,
        cache: KvCache,
    ) -> torch.Tensor | None:
        """x [B, H] embedded, one new token per decode item -> [B, H] after the last layer,
        K/V written; None where the forward is not all decode items."""
        if not plan.decode_all or plan.decode_pages is None or x.shape[0] > MAX_ITEMS:
            return None
        if cache is not self._cache:
            self._attach(cache)
        local = plan if local_plan is None else local_plan
        keep = [
            plan.decode_pages.contiguous(),
            plan.write_slots.contiguous(),
            plan.decode_lens.contiguous(),
            local.decode_lens.contiguous(),
            *(a.reshape(a.shape[0], -1).contiguous() for a in (cos, sin, local_cos, local_sin)),
        ]
        masks = [
            None if p.decode_mask is None else p.decode_mask.reshape(x.shape[0], -1).to(torch.uint8)
            for p in (plan, local)
        ]
        keep += [m for m in masks if m is not None]
        step = Step(
            x.shape[0],
            plan.decode_pages.shape[1],
            keep[0].data_ptr(),
            cache.page_size,
            *(t.data_ptr() for t in keep[1:4]),
            *(None if m is None else m.data_ptr() for m in masks),
            *(t.data_ptr() for t in keep[4:8]),
        )
        out = x.to(torch.float32).contiguous().clone()
        status = cpu_kernels.library().pie_decode_step(
            ctypes.byref(self._struct), ctypes.byref(step), out.data_ptr(), torch.get_num_threads()
        )
        if status:
            raise MemoryError("pie_decode_step: no memory for its scratch")
        self.steps += 1
        return out

"""Batch-1 decode in one compiled call per step (pie_decode_step in cpu_kernels.c).

Why: one sequence decoding on a CPU is what llama.cpp is best at, and there a layer of
the torch path is ~45 small ops around four weight reads whose dispatch costs about as
much as streaming the weights (bench/decode_step.py's skeleton). pie_decode_step runs
every layer of the new token in one OpenMP team: the same math in float32 on the same
quantized weights (pie's int4 and int8-group kernels), the K/V written into the paged
cache, attention over the item's pages with its mask.

`FusedDecode.build(model)` says whether a model can take it (CPU, float32, every linear
on pie's kernels, no soft-capping); `step` is called by LlamaModel.forward for a forward
of exactly one decode item and returns None where that step cannot take it.
"""

from __future__ import annotations

import ctypes

import torch

from pie.engine import cpu_kernels
from pie.engine.attention import AttentionPlan
from pie.engine.kv_cache import KvCache
from pie.engine.quant import Int4Linear, Int4OrDenseLinear, Int8GroupLinear

INT4, INT8 = 0, 1
ACTS = {"silu": 0, "gelu_pytorch_tanh": 1}
MAX_HEAD_DIM = 512  # the C side's RoPE scratch


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
        ("pages", ctypes.c_void_p),
        ("page_size", ctypes.c_int),
        ("write_slot", ctypes.c_long),
        ("T", ctypes.c_int),
        ("local_T", ctypes.c_int),
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
        desc = Linear(
            INT4, p.out_features, p.in_features, 32, _ptr(p.packed), _ptr(p.d), _ptr(p.m), b
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
        """x [1, H] embedded -> [1, H] after the last layer, K/V written; None: not this step."""
        if not plan.decode_all or plan.decode_pages is None or plan.decode_pages.shape[0] != 1:
            return None
        if cache is not self._cache:
            self._attach(cache)
        pages = plan.decode_pages[0].contiguous()
        keep = [pages]
        t, mask = _context(plan, cache.page_size, keep)
        local_t, local_mask = (
            (t, mask) if local_plan is None else _context(local_plan, cache.page_size, keep)
        )
        tables = [a.reshape(-1).contiguous() for a in (cos, sin, local_cos, local_sin)]
        step = Step(
            pages.data_ptr(),
            cache.page_size,
            int(plan.write_slots[0]),
            t,
            local_t,
            mask,
            local_mask,
            *(a.data_ptr() for a in tables),
        )
        out = x.to(torch.float32).contiguous().clone()
        status = cpu_kernels.library().pie_decode_step(
            ctypes.byref(self._struct), ctypes.byref(step), out.data_ptr(), torch.get_num_threads()
        )
        if status:
            raise MemoryError("pie_decode_step: no memory for its scratch")
        self.steps += 1
        return out


def _context(plan: AttentionPlan, page_size: int, keep: list) -> tuple[int, int | None]:
    """Slots attended and the mask's address (None: all of them) of a one-item decode plan."""
    if plan.decode_mask is None:
        return plan.single_len or plan.decode_pages.shape[1] * page_size, None
    mask = plan.decode_mask.reshape(-1).to(torch.uint8).contiguous()
    keep.append(mask)
    return mask.numel(), mask.data_ptr()

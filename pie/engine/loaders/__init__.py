"""Model loaders: turn a file or folder into a LoadedModel (config, weights, tokenizer).

Each format is an IModelLoader. pie's own are listed by `builtin_loaders`;
a third-party distribution adds a format by shipping a module in pie/plugins/
with an object that provides IPlugin and IModelLoader, which the service side
finds (pie.service.servicetypes.model_loaders) and passes to `load_model`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from pie.engine.cpu_path import CpuPath, choose_cpu_path, cpu_flags, int4_bf16_works
from pie.engine.llama import LlamaConfig
from pie.engine.quant import Int8Groups, Q4_1Weight
from pie.engine.tokenizer import Tokenizer
from pie.interfaces import PieError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model in memory, on the CPU, ready to be placed on a device by LlamaModel.

    weights: Hugging Face names -> float tensors ([out, in] for linear layers);
    quantized: the same names -> Q4_1 blocks where the file had them (lossless
    int4 kernels on CPU use these instead of the dense copies); rows: the same names ->
    int8 groups where the file had Q8_0/Q5_0/Q5_K/Q6_K (pie.engine.quant.Int8Groups).
    """

    name: str
    path: str
    format: str
    config: LlamaConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    quantized: dict[str, Q4_1Weight] = field(default_factory=dict)
    rows: dict[str, Int8Groups] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when present, else cpu; anything else is checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PieError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PieError(f"device {device!r} asked for, but CUDA is not available")
    return dev


def resolve_dtype(
    dtype: str | torch.dtype, device: torch.device, quantized: bool = False
) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA; on CPU what pie.engine.cpu_path chooses: bfloat16 where
    the int4 kernel runs `quantized` weights or the CPU has native bf16, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return auto_cpu_path(quantized).dtype
    if dtype not in DTYPES:
        raise PieError(f"bad dtype {dtype!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def auto_cpu_path(quantized: bool) -> CpuPath:
    """The CPU path `dtype auto` takes on this machine for a model with or without Q4_1 weights."""
    from pie.engine import cpu_kernels

    fp32_kernels = quantized and cpu_kernels.available()
    return choose_cpu_path(cpu_flags(), quantized, quantized and int4_bf16_works(), fp32_kernels)


def model_name_for(path: str) -> str:
    """The cache folder's name for $PIE_HOME/models/<name>/<file>, else the file or folder stem."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.isfile(path) and os.path.basename(os.path.dirname(parent)) == "models":
        return os.path.basename(parent)
    base = os.path.basename(path.rstrip(os.sep))
    return base.split(".")[0] if os.path.isfile(path) else base


def builtin_loaders() -> list:
    """pie's own IModelLoaders (GGUF, safetensors); plugins add more through the service."""
    from pie.engine.loaders.gguf_loader import GGUFLoader
    from pie.engine.loaders.hf_loader import SafetensorsLoader

    return [GGUFLoader(), SafetensorsLoader()]


def load_model(
    path: str, dtype: str | torch.dtype = "float32", loaders: list | None = None
) -> LoadedModel:
    """Load a model with the first of `loaders` (default: pie's own) that recognises `path`."""
    if not os.path.exists(path):
        raise PieError(f"model path {path!r} does not exist")
    loaders = builtin_loaders() if loaders is None else loaders
    for loader in loaders:
        if loader.can_load(path):
            return loader.load(path, "cpu", dtype)
    raise PieError(
        f"no model loader recognises {path!r} "
        f"(known formats: {', '.join(loader.formatName for loader in loaders)})"
    )

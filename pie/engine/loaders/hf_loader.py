"""Hugging Face model folders: config.json, *.safetensors (sharded or not), tokenizer.json."""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors.torch import load_file
from zope.interface import implementer

from pie.engine.llama import LlamaConfig
from pie.engine.loaders import DTYPES, LoadedModel, model_name_for
from pie.engine.tokenizer import Tokenizer
from pie.interfaces import IModelLoader, PieError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # qwen2: Llama with q/k/v biases


@implementer(IModelLoader)
class SafetensorsLoader:
    formatName = "safetensors"

    def can_load(self, path: str) -> bool:
        return (
            os.path.isdir(path)
            and os.path.isfile(os.path.join(path, "config.json"))
            and bool(glob.glob(os.path.join(path, "*.safetensors")))
        )

    def load(self, path: str, device: str, dtype: str) -> LoadedModel:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            hf_config = json.load(f)
        model_type = hf_config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise PieError(f"model_type {model_type!r} is not supported (llama-family only)")
        config = LlamaConfig.from_hf(hf_config, name=model_name_for(path))
        target = DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype
        weights: dict[str, torch.Tensor] = {}
        for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            for name, tensor in load_file(file).items():
                weights[name] = tensor.to(target) if tensor.is_floating_point() else tensor
        if config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return LoadedModel(
            name=config.name,
            path=path,
            format=self.formatName,
            config=config,
            weights=weights,
            tokenizer=Tokenizer.from_folder(path),
        )

"""pie's model loaders (GGUF files, Hugging Face safetensors folders) as IModelLoader plugins.

getPlugins imports every module of pie.plugins on each scan, so this module
stays light: it names the engine's loader classes and imports them (and torch)
only when a load is asked for.
"""

from __future__ import annotations

import importlib

from twisted.plugin import IPlugin
from zope.interface import implementer

from pie.interfaces import IModelLoader


@implementer(IPlugin, IModelLoader)
class EngineLoader:
    """An IModelLoader of pie.engine.loaders, imported on first use."""

    def __init__(self, formatName: str, module: str, cls: str) -> None:
        self.formatName = formatName
        self._where = (module, cls)
        self._loader = None

    def _engine_loader(self) -> object:
        if self._loader is None:
            module, cls = self._where
            self._loader = getattr(importlib.import_module(module), cls)()
        return self._loader

    def can_load(self, path: str) -> bool:
        return self._engine_loader().can_load(path)

    def load(self, path: str, device: str, dtype: str) -> object:
        return self._engine_loader().load(path, device, dtype)


gguf = EngineLoader("gguf", "pie.engine.loaders.gguf_loader", "GGUFLoader")
safetensors = EngineLoader("safetensors", "pie.engine.loaders.hf_loader", "SafetensorsLoader")

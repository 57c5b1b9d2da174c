"""Built-in model loaders (GGUF files, Hugging Face safetensors folders) as IModelLoader plugins."""

from pie.engine.loaders.gguf_loader import GGUFLoader
from pie.engine.loaders.hf_loader import SafetensorsLoader

gguf = GGUFLoader()
safetensors = SafetensorsLoader()

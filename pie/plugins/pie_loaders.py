"""Built-in model loaders (GGUF files, Hugging Face safetensors folders) as IModelLoader plugins."""

from pie.model.loaders.gguf_loader import GGUFLoader
from pie.model.loaders.hf_loader import SafetensorsLoader

gguf = GGUFLoader()
safetensors = SafetensorsLoader()

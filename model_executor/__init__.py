"""Models and their loading: HF folder -> nn.Module computing hidden states and logits.

May import `attention_backends`; never the engine (`sparsed_engine`).
"""
from model_executor.model_loader import ModelInfo, load_model, load_tokenizer, read_model_info
from model_executor.models import DreamModel, LLaDAModelLM, resolve_model_class

__all__ = ["DreamModel", "LLaDAModelLM", "ModelInfo", "load_model", "load_tokenizer", "read_model_info",
           "resolve_model_class"]

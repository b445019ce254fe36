"""Per-family denoisers: how a family's logits become committed tokens (see base.Denoiser)."""
from model_executor.denoisers.base import Denoiser
from model_executor.denoisers.dream import DreamDenoiser
from model_executor.denoisers.llada import LLaDADenoiser

__all__ = ["Denoiser", "DreamDenoiser", "LLaDADenoiser"]

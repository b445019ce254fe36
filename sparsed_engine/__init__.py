"""sparsed-engine: a vLLM-style inference engine for diffusion LMs with SparseD sparse attention."""
from sparsed_engine.llm import LLM
from sparsed_engine.outputs import CompletionOutput, RequestOutput
from sparsed_engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

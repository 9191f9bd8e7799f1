"""neo-serve: Ray Serve inference for EleutherAI's GPT-NeoX and GPT-Neo models.

Public surface: `LLM` and `SamplingParams` (offline engine).
"""

from neo_serve.engine.llm import LLM
from neo_serve.engine.outputs import CompletionOutput, RequestOutput
from neo_serve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

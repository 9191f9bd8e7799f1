"""neo-serve: Ray Serve inference for EleutherAI's GPT-NeoX and GPT-Neo models.

Public surface: `LLM` and `SamplingParams` (offline engine), `build_app` (the Ray Serve
application builder, imported on first use so that `import neo_serve` does not load Ray).
"""

from neo_serve.engine.llm import LLM
from neo_serve.engine.outputs import CompletionOutput, RequestOutput
from neo_serve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "build_app":
        from neo_serve.app import build_app

        return build_app
    raise AttributeError(f"module 'neo_serve' has no attribute {name!r}")

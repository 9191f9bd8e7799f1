"""The offline API, in the shape vLLM users know: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from neo_serve.engine.config import EngineConfig
from neo_serve.engine.llm_engine import LLMEngine
from neo_serve.engine.outputs import RequestOutput
from neo_serve.engine.sampling_params import SamplingParams


class LLM:
    """Generate offline with continuous batching.

    >>> llm = LLM("path/to/checkpoint", dtype="float32", num_stages=1)
    >>> outs = llm.generate(["a prompt", [12, 7, 99]], SamplingParams(max_tokens=32, temperature=0.0))

    `num_stages > 1` cuts the model into pipeline stages run in this process, in order; on a
    machine with several GPUs (device "cuda" or auto) the stages are spread over them.
    Other keyword arguments are `EngineConfig` fields (kv_cache_tokens, max_num_seqs, ...).
    """

    def __init__(self, model: str, **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_args))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Results come back in prompt order. A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids: list[str] = []
        finished: dict[str, RequestOutput] = {}
        try:
            for prompt, params in zip(prompts, params_list):
                request = self.engine.add_request(prompt, params)
                ids.append(request.request_id)
                if request.finished:  # nothing to compute (max_tokens=0, no prompt logprobs)
                    finished[request.request_id] = request.to_output()
            pending = set(ids) - set(finished)
            while pending:
                if not self.engine.scheduler.has_work():  # cannot happen unless the engine lost requests
                    raise RuntimeError(f"engine has no work left but requests {sorted(pending)} did not finish")
                for output in self.engine.step():
                    if output.finished and output.request_id in pending:
                        finished[output.request_id] = output
                        pending.discard(output.request_id)
        except BaseException:
            # A bad prompt, a failed step or Ctrl-C: leave the engine as it was, so that the next
            # call neither runs these requests nor finds their KV cache taken.
            for request_id in ids:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in ids]

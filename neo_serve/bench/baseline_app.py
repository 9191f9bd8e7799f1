"""The baseline of `neo-serve bench serve`: what a Ray Serve user gets by wrapping transformers'
`generate` in `@serve.batch(max_batch_size=8)`.

One deployment, one HTTP route (`POST` to its route prefix, `/baseline` in the benchmark, with
`{"prompt": [token ids], "max_tokens": n}` and, to sample, `temperature`, `top_p`, `top_k`,
`repetition_penalty` as in a completions request, answered with `{"token_ids": [...], "usage":
{...}}` once the whole completion is done; no streaming). Requests that arrive together are
generated as one left-padded static batch that runs for the batch's largest `max_tokens`; each
request gets back exactly its own `max_tokens` tokens (`eos_token_id=None`: no early stop, as
`ignore_eos` in neo-serve). A batch samples as its first request asks (the benchmark samples every
request alike).

It is given a fair chance: `generate` runs on a worker thread so the replica keeps queueing
requests into the next batch meanwhile, the replica accepts many requests at once (Serve's
default of 5 would starve the batcher), and it gets the same CPU threads as a neo-serve pipeline.

transformers is imported only inside the replica: it is a bench-only dependency.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from neo_serve.bench.engine_bench import Sampling

DTYPES = ("float32", "bfloat16", "float16")


class HFGenerateServer:
    """transformers `generate` behind `@serve.batch`, greedy unless a request asks to sample."""

    def __init__(self, checkpoint: str, *, dtype: str = "float32", num_threads: int = 1,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(num_threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
        self.model.generation_config.eos_token_id = None  # generate exactly the requested tokens
        self.model.generation_config.pad_token_id = 0
        self.batch_sizes: list[int] = []  # observed batch sizes, for the report
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, request: Request) -> JSONResponse:
        body = await request.json()
        prompt, max_tokens = body.get("prompt"), body.get("max_tokens")
        if (not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt)
                or not isinstance(max_tokens, int) or max_tokens < 1):
            return JSONResponse({"error": "prompt must be a non-empty list of token ids and max_tokens >= 1"},
                                status_code=400)
        try:
            sampling = Sampling(**{name: body[name] for name in Sampling().request_fields() if name in body})
            sampling.params(max_tokens)  # checked as neo-serve checks a request
        except Exception as exc:  # noqa: BLE001 - a bad field is the client's error
            return JSONResponse({"error": f"bad sampling parameters: {exc}"}, status_code=400)
        token_ids = await self.generate_batch((prompt, max_tokens, sampling))
        return JSONResponse({"token_ids": token_ids,
                             "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(token_ids)}})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[tuple[list[int], int, Sampling]]) -> list[list[int]]:
        self.batch_sizes.append(len(items))
        return await asyncio.to_thread(self._generate, [p for p, _, _ in items], [m for _, m, _ in items],
                                       items[0][2])

    def _generate(self, prompts: list[list[int]], max_tokens: list[int],
                  sampling: Sampling = Sampling()) -> list[list[int]]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        new_tokens = max(max_tokens)  # a static batch runs until its longest request is done
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      use_cache=True, **sampling.transformers_kwargs())
        return [out[row, width:width + m].tolist() for row, m in enumerate(max_tokens)]

    async def stats(self) -> dict[str, Any]:
        sizes = self.batch_sizes
        return {"batches": len(sizes), "mean_batch_size": sum(sizes) / len(sizes) if sizes else 0.0}

    async def reset_stats(self) -> None:
        self.batch_sizes = []


def build_baseline_app(checkpoint: str, *, dtype: str = "float32", num_threads: int = 1, max_batch_size: int = 8,
                       batch_wait_timeout_s: float = 0.01, max_ongoing_requests: int = 1024) -> serve.Application:
    """The baseline deployment for `checkpoint` (any transformers causal LM directory). It
    reserves `num_threads` CPUs and runs torch with as many threads."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    deployment = serve.deployment(HFGenerateServer).options(
        name="HFGenerate", ray_actor_options={"num_cpus": num_threads}, max_ongoing_requests=max_ongoing_requests)
    return deployment.bind(checkpoint, dtype=dtype, num_threads=num_threads, max_batch_size=max_batch_size,
                           batch_wait_timeout_s=batch_wait_timeout_s)

"""`neo-serve bench`: the engine against transformers on this machine, in one run.

Workloads (on a random checkpoint shaped like Pythia-160M):
- single: one request, 32-token prompt, 128 new tokens -> decode tokens/s, vs transformers
  `generate` with its KV cache;
- batch: 64 requests, prompts 32-256 tokens, 64-128 new tokens (fixed seed), all submitted at
  once -> generated tokens/s, vs transformers `generate` in left-padded static batches of 8 (what
  a Ray Serve user wrapping `generate` in `@serve.batch(max_batch_size=8)` gets).
Every request greedy, or with `--temperature T [--top-p P] [--top-k K] [--repetition-penalty R]`
sampled the same way in both systems (transformers: `do_sample=True`, its default top-k of 50
replaced by K, 0 = off).
Limits: weight bytes per decode step over the measured memory bandwidth (single), and the
workload's FLOPs over the measured matmul rate (batch).

transformers is needed here (it is the baseline) but never by the engine itself. torch and the
model code are imported inside the functions that measure: `neo-serve` builds every command's
options, these among them, so `neo-serve drain` (a Kubernetes preStop hook, on a deadline) and
`neo-serve --help` start without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neo_serve.bench.machine import STEAL_WARNING, StealMeter, format_steal
from neo_serve.config import load_model_config
from neo_serve.errors import InvalidRequestError

REPO_REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "pythia-160m.config.json"
DTYPES = ("float32", "bfloat16")  # the dtypes measured, as torch names them


@dataclass(frozen=True)
class Sampling:
    """How every request of a run samples: greedy (temperature 0) unless asked otherwise."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Sampling":
        """From the options of `add_sampling_arguments`, checked as a request's would be."""
        sampling = cls(args.temperature, args.top_p, args.top_k, args.repetition_penalty)
        try:
            sampling.params(1)
        except InvalidRequestError as exc:
            raise SystemExit(f"--{(exc.field or 'temperature').replace('_', '-')}: {exc}") from None
        return sampling

    def params(self, max_tokens: int):
        from neo_serve import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, repetition_penalty=self.repetition_penalty, ignore_eos=True)

    def request_fields(self) -> dict:
        """The same as fields of a completions request body (and of the served baseline's)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty}

    def describe(self) -> str:
        if self.temperature == 0.0:
            penalty = self.repetition_penalty
            return "greedy" + (f", repetition_penalty {penalty:g}" if penalty != 1.0 else "")
        return ", ".join(f"{name} {value:g}" for name, value in self.request_fields().items())

    def transformers_kwargs(self) -> dict:
        penalty = {"repetition_penalty": self.repetition_penalty} if self.repetition_penalty != 1.0 else {}
        if self.temperature == 0.0:
            return {"do_sample": False, **penalty}
        # top_k -1 is "off" to a completions request; transformers takes only 0 for that.
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": max(self.top_k, 0), **penalty}


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """How every request of a run samples, the same in every system measured."""
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="every request's temperature (0: greedy, the default), in every system")
    parser.add_argument("--top-p", type=float, default=1.0, help="every request's top_p, in every system")
    parser.add_argument("--top-k", type=int, default=0, help="every request's top_k (0: off), in every system")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="every request's repetition_penalty, in every system")


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def generated(self) -> int:
        return sum(self.max_tokens)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workloads(vocab: int, seed: int, num_requests: int) -> tuple[Workload, Workload]:
    rng = random.Random(seed)
    single = Workload([[rng.randrange(1, vocab) for _ in range(32)]], [128])
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(32, 256))] for _ in range(num_requests)]
    batch = Workload(prompts, [rng.randint(64, 128) for _ in range(num_requests)])
    return single, batch


def build_checkpoint(config_path: Path, out: Path) -> Path:
    """A random-weight checkpoint of the reference config's shape, with the demo's tokenizer."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoConfig, GPTNeoXForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    _train_tokenizer(out / "tokenizer.json")
    return out


def _train_tokenizer(file: Path, vocab_size: int = 8192) -> None:
    """A byte-level BPE on a slice of the standard library: prompts are token ids, but the
    engine detokenizes every generated token, as it does in service."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:100]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(file))


# ---- machine limits ---------------------------------------------------------------------------
def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: summing a large float32 tensor reads each byte once."""
    import torch

    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()
    start = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    return repeats * x.numel() * 4 / (time.perf_counter() - start)


def measure_matmul_rate(dtype: str, rows: int = 256, repeats: int = 30) -> float:
    """FLOP/s of a Pythia-160M-sized linear layer (768 -> 3072) on `rows` tokens of `dtype`."""
    import torch

    dtype = getattr(torch, dtype)
    a = torch.randn(rows, 768, dtype=dtype)
    w = torch.randn(3072, 768, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(a, w)
    return repeats * 2 * rows * 768 * 3072 / (time.perf_counter() - start)


def decode_weight_bytes(config, element: int) -> int:
    """Bytes of weights read per decode step (every layer and the head; one embedding row)."""
    from neo_serve.models.stages import head_param_count, layer_param_count

    return (config.num_layers * layer_param_count(config) + head_param_count(config)) * element


def flops_per_token(config, *, with_head: bool) -> int:
    from neo_serve.models.stages import head_param_count, layer_param_count

    params = config.num_layers * layer_param_count(config)
    if with_head:
        params += head_param_count(config)
    return 2 * params


# ---- runs -------------------------------------------------------------------------------------
def run_neo_serve(path: Path, dtype: str, workload: Workload, *, max_num_batched_tokens: int,
                  kv_cache_dtype: str = "auto", sampling: Sampling | None = None) -> dict:
    from neo_serve import LLM, SamplingParams

    sampling = sampling or Sampling()
    llm = LLM(str(path), dtype=dtype, max_num_batched_tokens=max_num_batched_tokens, kv_cache_dtype=kv_cache_dtype,
              kv_cache_tokens=max(32768, 2 * sum(len(p) + m for p, m in zip(workload.prompts, workload.max_tokens))))
    llm.generate([workload.prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    engine = llm.engine
    for prompt, max_tokens in zip(workload.prompts, workload.max_tokens):
        engine.add_request(prompt, sampling.params(max_tokens))
    first_token_at: list[float] = []
    start = time.perf_counter()
    generated = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if not first_token_at and output.outputs[0].token_ids:
                first_token_at.append(time.perf_counter())
            if output.finished:
                generated += sum(len(o.token_ids) for o in output.outputs)
    elapsed = time.perf_counter() - start
    assert generated == workload.generated, (generated, workload.generated)
    kv_dtype = engine.executor.workers[0].kv.tensor.dtype  # what `auto` resolved to
    result = {"seconds": elapsed, "generated": generated, "tokens_per_s": generated / elapsed,
              "kv_cache_dtype_used": str(kv_dtype).removeprefix("torch.")}
    if len(workload.prompts) == 1:
        decode_time = elapsed - (first_token_at[0] - start)
        result["decode_tokens_per_s"] = (generated - 1) / decode_time
    return result


def run_transformers(path: Path, dtype: str, workload: Workload, *, batch_size: int,
                     sampling: Sampling | None = None) -> dict:
    import torch
    from transformers import GPTNeoXForCausalLM

    sampling = sampling or Sampling()
    model = GPTNeoXForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # generate exactly the requested tokens
    model.generation_config.pad_token_id = 0

    def generate(prompts: list[list[int]], new_tokens: int) -> None:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, use_cache=True, **sampling.transformers_kwargs())

    generate([workload.prompts[0][:16]], 4)  # warm-up
    if len(workload.prompts) == 1:
        start = time.perf_counter()
        generate(workload.prompts, 1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        generate(workload.prompts, workload.max_tokens[0])
        elapsed = time.perf_counter() - start
        return {"seconds": elapsed, "generated": workload.generated, "tokens_per_s": workload.generated / elapsed,
                "decode_tokens_per_s": (workload.max_tokens[0] - 1) / (elapsed - prefill)}
    start = time.perf_counter()
    for first in range(0, len(workload.prompts), batch_size):
        group = workload.prompts[first:first + batch_size]
        # A static batch runs until its longest request is done; only requested tokens count.
        generate(group, max(workload.max_tokens[first:first + batch_size]))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "generated": workload.generated, "tokens_per_s": workload.generated / elapsed}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(REPO_REFERENCE),
                        help="config.json whose shape the random checkpoint takes (default: Pythia-160M)")
    parser.add_argument("--checkpoint-dir", default=str(Path.home() / ".cache" / "neo-serve" / "bench-pythia-160m"))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=8)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="neo-serve's KV cache dtype (auto on CPU: float32, or the model's half-precision "
                             "dtype where a probe at load finds its attention kernels clearly faster)")
    add_sampling_arguments(parser)
    parser.add_argument("--skip-transformers", action="store_true", help="measure neo-serve only")
    parser.add_argument("--json", default=None, help="also write the results here")


def run_engine_bench(args: argparse.Namespace) -> int:
    import torch

    config_path = Path(args.config)
    if not config_path.is_file():
        raise SystemExit(f"{config_path} not found: pass --config with a Pythia-160M-like config.json")
    dtypes = args.dtypes.split(",")
    if unknown := [d for d in dtypes if d not in DTYPES]:
        raise SystemExit(f"--dtypes: {', '.join(unknown)} not measured here; choose from {', '.join(DTYPES)}")
    path = build_checkpoint(config_path, Path(args.checkpoint_dir))
    config = load_model_config(path)
    single, batch = make_workloads(config.vocab_size, args.seed, args.requests)
    bandwidth = measure_bandwidth()
    machine = {"cpu": _cpu_name(), "cores": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "bandwidth_GBps": bandwidth / 1e9}
    print(f"machine: {machine}")
    sampling = Sampling.from_args(args)
    results = {"machine": machine, "sampling": dataclasses.asdict(sampling), "runs": []}
    for dtype in dtypes:
        element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        rate = measure_matmul_rate(dtype)
        single_limit = bandwidth / decode_weight_bytes(config, element)
        batch_flops = (batch.prompt_tokens * flops_per_token(config, with_head=False)
                       + batch.generated * flops_per_token(config, with_head=True))
        batch_limit = batch.generated / (batch_flops / rate)
        row = {"dtype": dtype, "kv_cache_dtype": args.kv_cache_dtype, "matmul_GFLOPs": rate / 1e9,
               "single_limit": single_limit, "batch_limit": batch_limit}
        engine = {"max_num_batched_tokens": args.max_num_batched_tokens, "kv_cache_dtype": args.kv_cache_dtype,
                  "sampling": sampling}
        row["ours_single"] = with_steal(lambda: run_neo_serve(path, dtype, single, **engine))
        row["ours_batch"] = with_steal(lambda: run_neo_serve(path, dtype, batch, **engine))
        if not args.skip_transformers:
            row["hf_single"] = with_steal(lambda: run_transformers(path, dtype, single, batch_size=1,
                                                                   sampling=sampling))
            row["hf_batch"] = with_steal(lambda: run_transformers(path, dtype, batch, batch_size=args.hf_batch_size,
                                                                  sampling=sampling))
        results["runs"].append(row)
        print(json.dumps(row, indent=1))
    print(f"sampling: {dataclasses.asdict(sampling)}")
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def with_steal(run: Callable[[], dict]) -> dict:
    """run()'s result with the CPU steal over it (`cpu_steal`, None where unknown)."""
    meter = StealMeter()
    result = run()
    result["cpu_steal"] = meter.fraction()
    return result


def format_table(results: dict) -> str:
    """The markdown table; CPU steal is neo-serve's / transformers' share over their runs."""
    lines = ["| dtype | KV cache | workload | neo-serve tok/s | transformers tok/s | speed-up | limit tok/s | "
             "% of limit | CPU steal |", "|---|---|---|---|---|---|---|---|---|"]
    stolen = 0
    for row in results["runs"]:
        for kind, run, key, limit in (("single stream decode", "single", "decode_tokens_per_s", row["single_limit"]),
                                      ("64 concurrent", "batch", "tokens_per_s", row["batch_limit"])):
            ours_run = row[f"ours_{run}"]
            ours = ours_run[key]
            hf = row.get(f"hf_{run}", {}).get(key)
            speedup = f"{ours / hf:.2f}x" if hf else "-"
            hf_text = f"{hf:.1f}" if hf else "-"
            kv = row["kv_cache_dtype"]
            if kv == "auto" and ours_run.get("kv_cache_dtype_used"):
                kv = f"auto ({ours_run['kv_cache_dtype_used']})"
            steals = [r.get("cpu_steal") for r in (ours_run, row.get(f"hf_{run}")) if r is not None]
            stolen += any((v or 0) > STEAL_WARNING for v in steals)
            steal_text = " / ".join(format_steal(v) for v in steals)
            lines.append(f"| {row['dtype']} | {kv} | {kind} | {ours:.1f} | {hf_text} | "
                         f"{speedup} | {limit:.1f} | "
                         f"{100 * ours / limit:.0f}% | {steal_text} |")
    if stolen:
        lines.append(f"\n**CPU steal above {STEAL_WARNING:.0%} in {stolen} row(s):** the hypervisor gave this "
                     "machine's vCPUs to other guests meanwhile; those rows measured a slower machine.")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

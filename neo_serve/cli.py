"""`neo-serve up | drain | generate | bench | plan | convert`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "demo_model"


def _generate(args: argparse.Namespace) -> int:
    from neo_serve import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    llm = LLM(args.model, dtype=args.dtype, num_stages=args.stages)
    prompt = " ".join(args.prompt)  # an unquoted prompt's words are one prompt, as the shell split them
    for output in llm.generate([prompt], params):
        print(output.prompt + output.outputs[0].text)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from neo_serve.config import load_model_config
    from neo_serve.plan import format_plan, plan_pipeline

    if args.stages is not None and args.stages != args.gpus:
        raise ValueError(f"--stages {args.stages} with --gpus {args.gpus}: a plan puts one stage on each GPU, "
                         "so leave --stages out (it defaults to --gpus)")
    if not os.path.exists(args.config):
        raise ValueError(f"--config {args.config}: no such file or directory (a checkpoint's config.json, or "
                         "the checkpoint directory holding it)")
    config = load_model_config(args.config)
    if args.gpus > config.num_layers:
        raise ValueError(f"--gpus {args.gpus}: the model has {config.num_layers} layers, and a pipeline puts at "
                         "least one on each GPU")

    def plan_for(gpus: int):
        return plan_pipeline(config, num_stages=gpus, gpu_memory=args.gpu_memory, dtype=args.dtype,
                             memory_utilization=args.memory_utilization)

    plan = plan_for(args.gpus)
    print(format_plan(plan, f"{config.architecture} ({args.config})"))
    if not plan.fits:  # the fewest GPUs of this size that hold it (meta device: no weights are read)
        fewest = next((gpus for gpus in range(args.gpus + 1, config.num_layers + 1) if plan_for(gpus).fits), None)
        print(f"fits on --gpus {fewest} of these GPUs" if fewest else
              f"no pipeline of up to {config.num_layers} of these GPUs holds it: use bigger GPUs")
    return 0 if plan.fits else 1


def _convert(args: argparse.Namespace) -> int:
    from neo_serve.convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst)
    print(f"wrote safetensors checkpoint to {out} (checked: config, shards, tensor names, tokenizer)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from neo_serve.bench.engine_bench import run_engine_bench

    return run_engine_bench(args)


def _bench_serve(args: argparse.Namespace) -> int:
    from neo_serve.bench.serve_bench import run_serve_bench

    return run_serve_bench(args)


def _bench_load(args: argparse.Namespace) -> int:
    from neo_serve.bench.load_test import run_load_test

    return run_load_test(args)


def _bench_score(args: argparse.Namespace) -> int:
    from neo_serve.bench.score_bench import run_score_bench

    return run_score_bench(args)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], the share of each GPU's memory to use; got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neo-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="serve checkpoints (default: the bundled demo) with Ray Serve",
        description="Start a local Ray + Serve (or join one with --address), deploy the OpenAI-compatible API "
                    "and the playground, print their URLs and serve until Ctrl-C or SIGTERM (the first lets "
                    "requests in flight finish; a second stops at once).",
        epilog="API keys: set NEO_SERVE_API_KEYS=key1,key2 in the environment; every route but /health, / and the "
               "API's description pages then wants Authorization: Bearer <key>, and the playground asks for one.")
    try:
        from neo_serve.serve.launcher import add_up_arguments, run_up
    except ImportError as exc:  # ray[serve] is not installed
        up.set_defaults(func=lambda _args, exc=exc: sys.exit(f"neo-serve up needs ray[serve]: {exc}"))
    else:
        add_up_arguments(up)
        up.set_defaults(func=run_up)

    drain = sub.add_parser("drain", help="move the serving off this Ray node before it stops (a Kubernetes "
                                         "preStop hook): Serve starts replacements, then finishes the streams here")
    from neo_serve.serve.drain import add_drain_arguments, run_drain

    add_drain_arguments(drain)
    drain.set_defaults(func=run_drain)

    gen = sub.add_parser("generate", help="generate offline with the in-process engine")
    gen.add_argument("prompt", nargs="+", help="the prompt (several words are joined with spaces into one)")
    gen.add_argument("--model", default=str(DEMO_MODEL), help="checkpoint directory (default: the bundled demo)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--stages", type=_positive_int, default=1)
    gen.add_argument("--max-tokens", type=_positive_int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_generate, input_errors_as_messages=True)

    bench = sub.add_parser("bench", help="benchmark the engine (or with `bench serve`, the served path) "
                                         "against transformers on this machine")
    from neo_serve.bench.engine_bench import add_bench_arguments
    from neo_serve.bench.serve_bench import add_serve_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="{serve,load,score}")
    serve_bench = bench_sub.add_parser(
        "serve", help="N concurrent streaming HTTP clients against the Ray Serve app, the offline engine and a "
                      "transformers @serve.batch baseline")
    add_serve_bench_arguments(serve_bench)
    serve_bench.set_defaults(func=_bench_serve)
    from neo_serve.bench.load_test import add_load_arguments

    load = bench_sub.add_parser(
        "load", help="bounded load test on loopback: C concurrent streaming requests per round against the app; "
                     "each must complete or be refused cleanly, and memory must stay bounded")
    add_load_arguments(load)
    load.set_defaults(func=_bench_load)
    from neo_serve.bench.score_bench import add_score_bench_arguments

    score = bench_sub.add_parser(
        "score", help="prompt scoring as lm-evaluation-harness requests it (echo, logprobs, max_tokens 0): served "
                      "against the offline engine, logprobs checked")
    add_score_bench_arguments(score)
    score.set_defaults(func=_bench_score, input_errors_as_messages=True)

    plan = sub.add_parser("plan", help="stage split, weights and KV capacity per GPU, on the meta device")
    plan.add_argument("--config", required=True, help="a checkpoint's config.json (or its directory)")
    plan.add_argument("--gpus", type=_positive_int, required=True, help="GPUs per pipeline (one stage each)")
    plan.add_argument("--stages", type=_positive_int, default=None, help="stages: one per GPU, so only --gpus")
    plan.add_argument("--gpu-memory", default="24GiB",
                      help="memory of one GPU as CUDA reports it (nvidia-smi's total), e.g. 80GiB; a '24 GB' A10G "
                           "or L4 has about 22GiB, an RTX 4090 24GiB (default 24GiB)")
    plan.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                      help="weights and KV dtype (auto: the checkpoint's, as config.json names it, else float32, "
                           "as a GPU would serve it)")
    plan.add_argument("--memory-utilization", type=_fraction, default=0.90,
                      help="share of each GPU's memory for weights and KV cache (default 0.90)")
    plan.set_defaults(func=_plan, input_errors_as_messages=True)

    convert = sub.add_parser("convert", help="pickle .bin checkpoint -> sharded safetensors")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.set_defaults(func=_convert, input_errors_as_messages=True)
    return parser


def _remember_subparsers(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command's parsed args the parser of that command, `command_parser`."""
    parser.set_defaults(command_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _remember_subparsers(subparser)


def main(argv: list[str] | None = None) -> int:
    from neo_serve.errors import NeoServeError

    parser = build_parser()
    _remember_subparsers(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand, with its usage (the top-level usage does not help)
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except (NeoServeError, ValueError, OSError) as exc:  # OSError: a path that is a file, a full disk
        if not getattr(args, "input_errors_as_messages", False):
            raise
        # Bad input (a path, a config, a size): one line naming it, not a traceback.
        print(f"neo-serve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

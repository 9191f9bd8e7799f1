#!/usr/bin/env python3
"""Score a served model with lm-evaluation-harness and check it against transformers.

What a researcher does with neo-serve: run lm-evaluation-harness's `local-completions` model
against the OpenAI completions endpoint (it scores with `echo` + `logprobs`, and generates with
`stop` strings). This
script runs four small local tasks (no dataset download) twice, through a running neo-serve
and through lm-evaluation-harness's own `hf` model on the same checkpoint, and compares every
request's log-likelihood and is-greedy flag, and every greedy generation's text.

    neo-serve up &                                   # the bundled demo (or your checkpoint)
    pip install "lm-eval[api]>=0.4.13"               # 0.4.9 fails to import with transformers 5
    python scripts/lm_eval_parity.py                 # --checkpoint DIR --model NAME for another model

Two of the scored texts are built at least 64 tokens longer than the window (from
GET /v1/models, or --window), and lm-evaluation-harness cuts them on the left.
`local-completions` tokenizes through the server's /tokenize (`--tokenizer checkpoint`: with the
checkpoint's files) and is given the window as `max_length` and sends at most `max_length` - 1
tokens (it asks for one generated token besides, docs/serving.md); `hf` keeps `max_length` + 1
tokens and feeds all but the last, so it is given the window less two: both then score the
same tokens after the same context.

Exit code 0 when all 52 log-likelihoods agree within --tolerance (1e-4) with equal is-greedy
flags and all 10 generated texts are equal and not empty; 1 otherwise. Offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set for both runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import yaml

DEMO = Path(__file__).resolve().parent.parent / "neo_serve" / "demo_model"
LINES = ["import os", "def main():", "class Foo(object):", "return self.value", "for i in range(10):",
         "if __name__ == '__main__':", "raise ValueError('bad')", "print('hello world')", "import sys",
         "def __init__(self):"]
TASK_NAMES = ("neo_lm", "neo_gen", "neo_mc", "neo_long")
# requests: 10 + 10 x 4 choices + 2 longer than the window; 10 generations
EXPECTED = {"loglikelihood": 52, "generate_until": 10}


def task(name: str, data: str, output_type: str, metrics: list[str], **fields: object) -> dict:
    """An lm-evaluation-harness task over a local JSON-lines file (no download)."""
    lower_is_better = {"perplexity"}
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
            "test_split": "test", "output_type": output_type, "target_delimiter": "", **fields,
            "metric_list": [{"metric": metric, "aggregation": "perplexity" if metric in lower_is_better else "mean",
                             "higher_is_better": metric not in lower_is_better} for metric in metrics]}


def tasks(directory: Path) -> dict[str, dict]:
    lines, choices, long = (str(directory / name) for name in ("lm.jsonl", "mc.jsonl", "long.jsonl"))
    return {
        # Continue a line of Python after its first word: loglikelihood (perplexity, greedy accuracy).
        "neo_lm": task("neo_lm", lines, "loglikelihood", ["perplexity", "acc"],
                       doc_to_text="{{context}}", doc_to_target="{{target}}"),
        # The same lines completed greedily until their end: generate_until (a completion with `stop`).
        "neo_gen": task("neo_gen", lines, "generate_until", ["exact_match"], doc_to_text="{{context}}",
                        doc_to_target="{{target}}",
                        generation_kwargs={"until": ["\n"], "max_gen_toks": 24, "do_sample": False}),
        # Pick the line among four: multiple_choice (one loglikelihood request per choice).
        "neo_mc": task("neo_mc", choices, "multiple_choice", ["acc"], doc_to_text="{{question}}",
                       doc_to_choice="{{choices}}", doc_to_target="label"),
        # A line after more code than the window holds: scored on the window's last tokens.
        "neo_long": task("neo_long", long, "loglikelihood", ["perplexity", "acc"],
                         doc_to_text="{{context}}", doc_to_target="{{target}}"),
    }


def long_context(seed: int, tokenizer, window: int) -> str:
    """Lines of Python, drawn with `seed`, until they are more than 64 tokens longer than the window."""
    rng, lines = random.Random(seed), []
    while len(tokenizer("\n".join(lines))["input_ids"]) <= window + 64:
        lines.extend(rng.choices(LINES, k=50))
    return "\n".join(lines)


def write_tasks(directory: Path, checkpoint: str, window: int) -> None:
    rng = random.Random(0)
    with open(directory / "lm.jsonl", "w") as lm, open(directory / "mc.jsonl", "w") as mc:
        for line in LINES:
            cut = line.index(" ")
            lm.write(json.dumps({"context": line[:cut], "target": line[cut:]}) + "\n")
            choices = rng.sample([other for other in LINES if other != line], 3) + [line]
            rng.shuffle(choices)
            mc.write(json.dumps({"question": "# a line of Python\n", "choices": choices,
                                 "label": choices.index(line)}) + "\n")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with open(directory / "long.jsonl", "w") as long:
        for seed in (1, 2):  # more tokens than the window, then the start of one more line
            body = long_context(seed, tokenizer, window)
            long.write(json.dumps({"context": body + "\nimport", "target": " os"}) + "\n")
    for name, config in tasks(directory).items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def run_lm_eval(model: str, model_args: str, directory: Path, out: Path, *extra: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
               "--include_path", str(directory), "--tasks", ",".join(TASK_NAMES), "--output_path", str(out),
               "--log_samples", *extra]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, env=env, check=True)


def samples(out: Path, task: str) -> list[dict]:
    [path] = glob.glob(f"{out}/**/samples_{task}_*.jsonl", recursive=True)
    return sorted((json.loads(line) for line in open(path)), key=lambda record: record["doc_id"])


def served_window(completions_url: str, model: str) -> int:
    """The model's `max_model_len` as the server's `GET /v1/models` lists it."""
    models_url = completions_url.rsplit("/completions", 1)[0] + "/models"
    with urllib.request.urlopen(models_url, timeout=30) as response:
        listed = {entry["id"]: entry for entry in json.load(response)["data"]}
    if model not in listed:
        raise SystemExit(f"{models_url} does not serve {model!r} (it serves {', '.join(sorted(listed))})")
    window = listed[model].get("max_model_len")
    if window is None:  # an app built with verify_checkpoints: false does not know it
        raise SystemExit(f"{models_url} gives no max_model_len for {model!r}: pass --window")
    return int(window)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEMO), help="the checkpoint the server serves (default: the demo)")
    parser.add_argument("--model", default="neo-demo", help="its served name (default neo-demo)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1/completions")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--tokenizer", choices=["server", "checkpoint"], default="server",
                        help="where local-completions tokenizes: through the server's /tokenize (lm-eval's remote "
                             "backend, the default) or the checkpoint's files (its huggingface backend)")
    parser.add_argument("--window", type=int, default=None,
                        help="the served model's context window (default: its max_model_len in GET /v1/models)")
    args = parser.parse_args()
    window = args.window or served_window(args.base_url, args.model)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        write_tasks(directory, args.checkpoint, window)
        run_lm_eval("hf", f"pretrained={args.checkpoint},dtype=float32,max_length={window - 2}", directory,
                    directory / "hf",
                    "--device", "cpu", "--batch_size", "4")
        tokenizer = ("tokenizer_backend=remote" if args.tokenizer == "server"
                     else f"tokenizer={args.checkpoint},tokenizer_backend=huggingface")
        run_lm_eval("local-completions", f"model={args.model},base_url={args.base_url},{tokenizer},"
                    f"num_concurrent=4,max_retries=2,max_length={window}", directory, directory / "served")
        generations = list(zip(samples(directory / "hf", "neo_gen"), samples(directory / "served", "neo_gen"),
                               strict=True))
        texts_differ = [(reference["doc_id"], reference["resps"][0][0], served["resps"][0][0])
                        for reference, served in generations if reference["resps"][0][0] != served["resps"][0][0]]
        non_empty = sum(bool(served["resps"][0][0]) for _, served in generations)
        if generations:
            print(f"first greedy generation: {generations[0][1]['arguments']!r} -> "
                  f"{generations[0][1]['resps'][0][0]!r}")
        worst, mismatched, count = 0.0, 0, 0
        for task_name in ("neo_lm", "neo_mc", "neo_long"):
            for reference, served in zip(samples(directory / "hf", task_name),
                                         samples(directory / "served", task_name), strict=True):
                for (ref_ll, ref_greedy), (ll, greedy) in zip(
                        (r[0] for r in reference["resps"]), (r[0] for r in served["resps"]), strict=True):
                    difference = abs(float(ref_ll) - float(ll))
                    worst = max(worst, difference) if difference == difference else float("nan")
                    # `not <=`: a NaN on either side is a mismatch too.
                    mismatched += not difference <= args.tolerance or ref_greedy != greedy
                    count += 1
    for doc_id, reference_text, served_text in texts_differ:
        print(f"neo_gen document {doc_id}: transformers generated {reference_text!r}, neo-serve {served_text!r}")
    complete = count == EXPECTED["loglikelihood"] and len(generations) == EXPECTED["generate_until"]
    ok = complete and not mismatched and not texts_differ and non_empty == len(generations)
    print(f"{count} log-likelihood requests (of {EXPECTED['loglikelihood']}): largest difference {worst:.2e}, "
          f"{mismatched} past the tolerance {args.tolerance:g} or with another is-greedy flag; "
          f"{len(generations)} greedy generations ({non_empty} not empty), differing: {len(texts_differ)} "
          f"-> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

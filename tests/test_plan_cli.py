"""`neo-serve plan` on the real GPT-NeoX-20B config, and the offline CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from neo_serve.cli import main
from neo_serve.config import load_model_config
from neo_serve.models import partition_layers
from neo_serve.plan import parse_bytes, plan_pipeline


def test_plan_gpt_neox_20b_on_gpus(reference_dir, capsys):
    config = load_model_config(reference_dir / "gpt-neox-20b.config.json")
    two = plan_pipeline(config, num_stages=2, gpu_memory="40GiB", dtype="float16")
    total_weights = sum(stage.weight_bytes for stage in two.stages)
    assert 40e9 < total_weights < 42e9  # about 41 GB in float16, as published
    assert [(s.layer_start, s.layer_end) for s in two.stages] == [(0, 22), (22, 44)]
    assert two.fits and two.kv_tokens > 10_000
    # KV per token and stage: 22 layers x (K and V) x 6144 x 2 bytes
    assert two.stages[0].kv_bytes_per_token == 22 * 2 * 6144 * 2
    one = plan_pipeline(config, num_stages=1, gpu_memory="24GiB", dtype="float16")
    assert not one.fits
    assert main(["plan", "--config", str(reference_dir / "gpt-neox-20b.config.json"), "--gpus", "4",
                 "--gpu-memory", "24GiB"]) == 0
    printed = capsys.readouterr().out
    assert "33-43" in printed and "pipeline KV capacity" in printed
    assert main(["plan", "--config", str(reference_dir / "gpt-neox-20b.config.json"), "--gpus", "1",
                 "--gpu-memory", "24GiB"]) == 1
    printed = capsys.readouterr().out
    assert "DOES NOT FIT" in printed and printed.endswith("fits on --gpus 2 of these GPUs\n")  # the fewest
    # The weights fit two 23 GiB GPUs, but beside them not one 2048-token context: the engine
    # would refuse such a kv_cache_tokens, so the plan must not say it fits.
    tight = plan_pipeline(config, num_stages=2, gpu_memory="23GiB", dtype="float16")
    assert tight.weights_fit and 0 < tight.kv_tokens < 2048 and not tight.fits
    assert main(["plan", "--config", str(reference_dir / "gpt-neox-20b.config.json"), "--gpus", "2",
                 "--gpu-memory", "23GiB"]) == 1
    assert f"max_model_len <= {tight.kv_tokens // 256 * 256}" in capsys.readouterr().out


def test_plan_sizes_the_dtype_the_model_is_served_in(reference_dir, capsys):
    # GPT-Neo's configs name no dtype and its published weights are float32, which is what
    # `dtype: auto` serves on a GPU: planned in float16, 2.7B would need half the memory it does.
    neo = load_model_config(reference_dir / "gpt-neo-2.7b.config.json")
    auto = plan_pipeline(neo, num_stages=1, gpu_memory="24GiB")
    assert auto.dtype == "float32" and 10.5e9 < sum(s.weight_bytes for s in auto.stages) < 11.5e9
    half = plan_pipeline(neo, num_stages=1, gpu_memory="24GiB", dtype="float16")
    assert sum(s.weight_bytes for s in half.stages) * 2 == sum(s.weight_bytes for s in auto.stages)
    # The head shares the embedding's tensor on a stage holding both (as the loader ties them):
    # GPT-Neo-2.7B's published 2,651,307,520 parameters. On two stages each holds its own.
    assert half.stages[0].weight_bytes == 2 * 2_651_307_520
    wte = neo.vocab_size * neo.hidden_size
    split = plan_pipeline(neo, num_stages=2, gpu_memory="24GiB", dtype="float16")
    assert sum(s.weight_bytes for s in split.stages) == 2 * (2_651_307_520 + wte)
    # GPT-NeoX-20B's config says float16.
    assert plan_pipeline(load_model_config(reference_dir / "gpt-neox-20b.config.json"), num_stages=4,
                         gpu_memory="24GiB").dtype == "float16"
    assert main(["plan", "--config", str(reference_dir / "gpt-neo-2.7b.config.json"), "--gpus", "1",
                 "--gpu-memory", "24GiB"]) == 0
    assert "1 stage(s) in float32" in capsys.readouterr().out


def test_stages_balance_the_work_per_token(reference_dir):
    def split(name: str, num_stages: int) -> list[tuple[int, int]]:
        config = load_model_config(reference_dir / name)
        return [(s.layer_start, s.layer_end) for s in partition_layers(config, num_stages)]

    # Pythia-160M's 50k-row head holds 5.5 layers' parameters (as does its embedding), but it
    # runs for sampled tokens only, and the embedding is a lookup: by parameter bytes the split
    # was 6 + 6 layers, leaving the head's stage the slowest.
    assert split("pythia-160m.config.json", 2) == [(0, 7), (7, 12)]
    # A model that needs stages has layers far larger than its head: the split is even, as
    # by bytes, so what `neo-serve plan` sizes for GPUs does not move.
    assert split("gpt-neox-20b.config.json", 2) == [(0, 22), (22, 44)]
    assert split("gpt-neox-20b.config.json", 4) == [(0, 11), (11, 22), (22, 33), (33, 44)]


@pytest.mark.parametrize("text,value", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("512Mi", 512 * 2**20), (7, 7)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_names_the_problem():
    with pytest.raises(ValueError, match="24 gigs"):
        parse_bytes("24 gigs")


@pytest.mark.parametrize("memory, message", [("24", "GPU memory '24' has no unit: write e.g. 24GiB or 24GB"),
                                             ("0GiB", "GPU memory must be more than 0, got '0GiB' (use e.g. 24GiB, 80GB)")])
def test_plan_refuses_a_gpu_memory_without_unit_or_size(reference_dir, capsys, memory, message):
    # `--gpu-memory 24` was read as 24 bytes: "0.0 GiB per GPU ... DOES NOT FIT", exit 1.
    assert main(["plan", "--config", str(reference_dir / "gpt-neox-20b.config.json"), "--gpus", "2",
                 "--gpu-memory", memory]) == 2
    assert capsys.readouterr().err.strip() == f"neo-serve plan: {message}"


def test_generate_cli_on_the_bundled_demo(capsys):
    from neo_serve import LLM, SamplingParams
    from neo_serve.serve.config import DEMO_CHECKPOINT

    assert main(["generate", "def hello_world():", "--max-tokens", "24"]) == 0
    text = capsys.readouterr().out
    # Greedy by default, the demo's own dtype rule (auto), 24 tokens: the engine's completion.
    [expected] = LLM(str(DEMO_CHECKPOINT)).generate(["def hello_world():"], SamplingParams(max_tokens=24, temperature=0))
    assert len(expected.outputs[0].token_ids) == 24
    assert text == "def hello_world():" + expected.outputs[0].text + "\n"


def test_generate_takes_an_unquoted_prompt_as_one_prompt(capsys):
    assert main(["generate", "def hello_world():", "--max-tokens", "6"]) == 0
    quoted = capsys.readouterr().out
    assert main(["generate", "def", "hello_world():", "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == quoted  # greedy: the same single completion


def test_bad_cli_input_is_one_line_naming_it(reference_dir, tmp_path, capsys):
    neox = str(reference_dir / "gpt-neox-20b.config.json")
    cases = [
        (["plan", "--config", str(tmp_path / "nowhere"), "--gpus", "2"], "neo-serve plan: --config ", "nowhere"),
        (["plan", "--config", neox, "--gpus", "45"], "neo-serve plan: --gpus 45: ", "44 layers"),
        (["plan", "--config", neox, "--gpus", "2", "--gpu-memory", "24XB"], "neo-serve plan: ", "24XB"),
        # --stages must not quietly plan 4 GPUs' memory on 2.
        (["plan", "--config", neox, "--gpus", "2", "--stages", "4"], "neo-serve plan: ", "one stage on each GPU"),
        (["generate", "hi", "--model", str(tmp_path / "nowhere")], "neo-serve generate: ", "nowhere"),
        (["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")], "neo-serve convert: ", "nowhere"),
    ]
    for argv, prefix, named in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(prefix) and named in err and "Traceback" not in err, (argv, err)
    # Values argparse can check are refused with its usage line.
    for argv in (["plan", "--config", neox, "--gpus", "0"],
                 ["plan", "--config", neox, "--gpus", "2", "--memory-utilization", "1.5"],
                 ["generate", "hi", "--stages", "0"], ["generate", "hi", "--dtype", "fp16"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert "error: argument" in capsys.readouterr().err
    # An option the subcommand does not know is named with that subcommand's usage (it printed
    # the top-level usage, which does not list the option's neighbours).
    for argv, command in ((["up", "--bogus"], "up"), (["bench", "serve", "--nope"], "bench serve"),
                          (["generate", "hi", "--tokens", "3"], "generate")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"usage: neo-serve {command} ") and "unrecognized arguments: " in err, err


def test_the_command_line_is_built_without_torch():
    """`neo-serve drain` runs as a Kubernetes preStop hook on a deadline, `neo-serve --help` on a
    laptop: parsing a command (every command's options, the benches' among them) imports neither
    torch, transformers nor the model code (about 2 s on a 2 GHz core, before the hook's work)."""
    probe = ("import sys\n"
             "from neo_serve.cli import build_parser\n"
             "assert build_parser().parse_args(['drain', '--deadline-s', '90']).deadline_s == 90\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')\n"
             "             or m.startswith('neo_serve.models')))\n")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout[:500]

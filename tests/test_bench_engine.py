"""`neo-serve bench`'s report: each row says how much CPU the hypervisor took meanwhile.

The engine bench itself runs for minutes (it is a benchmark, not a test); its measurements
(exact tokens, throughput) are what test_engine checks. Here: the table it prints, and its
sampled workload (`--temperature`, `--top-p`) run in both systems on a tiny checkpoint.
"""

from __future__ import annotations

import argparse

from neo_serve.bench.engine_bench import (Sampling, Workload, add_bench_arguments, format_table, run_neo_serve,
                                          run_transformers, with_steal)


def test_a_sampled_workload_runs_in_both_systems(neox_checkpoint):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--temperature", "0.8", "--top-p", "0.95", "--top-k", "50",
                              "--repetition-penalty", "1.1"])
    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.repetition_penalty)
    assert sampling.transformers_kwargs() == {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 50,
                                              "repetition_penalty": 1.1}
    params = sampling.params(7)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.8, 0.95, 50, 1.1)
    assert Sampling().transformers_kwargs() == {"do_sample": False}  # the default stays greedy
    workload = Workload([[5, 6, 7, 8], [9, 10]], [6, 4])
    ours = run_neo_serve(neox_checkpoint, "float32", workload, max_num_batched_tokens=64, sampling=sampling)
    theirs = run_transformers(neox_checkpoint, "float32", workload, batch_size=2, sampling=sampling)
    assert ours["generated"] == theirs["generated"] == 10


def test_each_run_records_cpu_steal():
    result = with_steal(lambda: {"tokens_per_s": 1.0, "spin": sum(range(2_000_000))})
    assert result["tokens_per_s"] == 1.0
    assert result["cpu_steal"] is not None and 0 <= result["cpu_steal"] <= 1  # /proc/stat on Linux


def test_table_shows_steal_per_row_and_flags_rows_above_ten_percent():
    def row(steal: float) -> dict:
        return {"dtype": "float32", "kv_cache_dtype": "auto", "single_limit": 100.0, "batch_limit": 500.0,
                "ours_single": {"decode_tokens_per_s": 40.0, "kv_cache_dtype_used": "float32", "cpu_steal": 0.01},
                "ours_batch": {"tokens_per_s": 200.0, "cpu_steal": steal},
                "hf_single": {"decode_tokens_per_s": 30.0, "cpu_steal": 0.0},
                "hf_batch": {"tokens_per_s": 100.0, "cpu_steal": 0.02}}

    quiet = format_table({"runs": [row(0.03)]})
    assert "| % of limit | CPU steal |" in quiet
    assert "| float32 | auto (float32) | single stream decode | 40.0 | 30.0 | 1.33x | 100.0 | 40% | 1% / 0% |" in quiet
    assert "| float32 | auto | 64 concurrent | 200.0 | 100.0 | 2.00x | 500.0 | 40% | 3% / 2% |" in quiet
    assert "CPU steal above" not in quiet
    noisy = format_table({"runs": [row(0.35)]})
    assert "| 35% / 2% |" in noisy
    assert "**CPU steal above 10% in 1 row(s):**" in noisy

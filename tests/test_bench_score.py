"""`neo-serve bench score`: lm-evaluation-harness's scoring requests against a real local app, on
the bundled demo model, checked against the offline engine's logprobs."""

from __future__ import annotations

import json

import pytest
import ray

from neo_serve.cli import main as cli_main


@pytest.mark.timeout(240)
def test_tiny_scoring_run_checks_served_logprobs_against_offline(tmp_path, capsys, monkeypatch):
    out = tmp_path / "score.json"
    # As in a KubeRay pod, where RAY_ADDRESS names the pod's cluster: the bench still starts a
    # cluster of its own (its measurements, and its Serve shutdown, assume one).
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    # Two stages: the scoring plan goes to the last stage over Ray, and logprobs come back.
    assert cli_main(["bench", "score", "--models", "demo", "--stages", "2", "--prompts", "3", "--prompt-len", "24",
                     "--clients", "2", "--logprobs", "2", "--json", str(out)]) == 0
    assert not ray.is_initialized()  # Ray is shut down at the end
    results = json.loads(out.read_text())
    assert results["failures"] == []
    points = {p["system"]: p for p in results["points"]}
    assert set(points) == {"offline", "transformers", "neo-serve 2 stages"}
    for point in points.values():
        assert point["model"] == "neo-demo" and point["prompts"] == 3 and point["prompt_tokens"] == 3 * 24
        assert point["errors"] == [] and point["seconds"] > 0
        assert point["tokens_per_s"] == pytest.approx(point["prompt_tokens"] / point["seconds"])
    served = points["neo-serve 2 stages"]
    assert served["max_abs_diff"] is not None and served["max_abs_diff"] <= 1e-4
    # The baseline scores the same prompts with transformers' own kernels: the same numbers up to
    # float32 rounding.
    assert 0 <= points["transformers"]["max_abs_diff"] < 1e-3
    report = capsys.readouterr().out
    assert "| model | system | prompt tokens/s | vs offline | max abs logprob diff vs offline |" in report
    assert "| neo-demo | neo-serve 2 stages |" in report
    assert "3 prompts of 24 token ids, scored with `echo`, `logprobs: 2`, `max_tokens: 0` (2 HTTP clients)" in report
    assert "transformers: forward passes over 8 prompts at a time" in report


def test_bad_options_are_named(capsys):
    assert cli_main(["bench", "score", "--prompt-len", "1"]) == 2
    assert "--prompt-len must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused as it is parsed, before the offline engine runs
        cli_main(["bench", "score", "--stages", "0"])
    assert "--stages" in capsys.readouterr().err

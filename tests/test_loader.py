"""Loading: only a stage's tensors, safetensors only, errors that name the tensors and files."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from neo_serve import LLM, SamplingParams
from neo_serve.cli import main as cli_main
from neo_serve.config import load_model_config
from neo_serve.errors import CheckpointError
from neo_serve.loader import CheckpointFiles, load_stage, resolve_dtype
from neo_serve.models import partition_layers


def copy_checkpoint(src, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    return dst


def pickle_source(neox_checkpoint, directory, *, weights=None, with_meta=True):
    """A pickle-weights copy of the tiny checkpoint; `weights`: file name -> what to torch.save."""
    directory.mkdir()
    if with_meta:
        for name in ("config.json", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"):
            shutil.copy2(neox_checkpoint / name, directory / name)
    state = load_file(neox_checkpoint / "model.safetensors")
    for name, content in (weights or {"pytorch_model.bin": state}).items():
        torch.save(content(state) if callable(content) else content, directory / name)
    return directory


def greedy_tokens(checkpoint) -> list[int]:
    return LLM(str(checkpoint)).generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].token_ids


def test_stage_reads_only_its_own_tensors(neox_sharded_checkpoint, monkeypatch):
    files = CheckpointFiles.open(neox_sharded_checkpoint)
    assert len(set(files.tensor_files.values())) > 1  # really sharded
    config = load_model_config(neox_sharded_checkpoint)
    read: list[str] = []
    import neo_serve.loader as loader

    real_set = loader._set_tensor
    monkeypatch.setattr(loader, "_set_tensor", lambda model, name, *a: (read.append(name), real_set(model, name, *a)))
    stages = partition_layers(config, 2)
    model = load_stage(neox_sharded_checkpoint, config, stages[1], dtype=torch.float32, files=files)
    assert read and all(name.startswith(("gpt_neox.layers.2.", "gpt_neox.layers.3.", "gpt_neox.final_layer_norm",
                                         "embed_out")) for name in read)
    assert not any("embed_in" in name or "layers.0." in name for name in read)
    assert all(p.device.type == "cpu" for p in model.parameters())  # nothing left on meta
    assert model.gpt_neox.embed_in is None and set(model.gpt_neox.layers.keys()) == {"2", "3"}


def test_dtype_auto_follows_the_checkpoint(neox_checkpoint, tmp_path):
    config = load_model_config(neox_checkpoint)
    assert resolve_dtype("auto", config, CheckpointFiles.open(neox_checkpoint), "cpu") == torch.float32
    half = copy_checkpoint(neox_checkpoint, tmp_path)
    tensors = {k: v.to(torch.float16) for k, v in load_file(half / "model.safetensors").items()}
    save_file(tensors, half / "model.safetensors")
    raw = json.loads((half / "config.json").read_text())
    raw.pop("dtype", None)
    raw.pop("torch_dtype", None)
    (half / "config.json").write_text(json.dumps(raw))
    # On a GPU `auto` keeps the stored float16; on a CPU, which has no fast float16 kernels,
    # the worker loads the model in float32.
    half_config = load_model_config(half)
    assert resolve_dtype("auto", half_config, CheckpointFiles.open(half), "cuda:0") == torch.float16
    llm = LLM(str(half), dtype="auto")
    worker = llm.engine.executor.workers[0]
    assert worker.dtype == torch.float32 and worker.model.embed_out.weight.dtype == torch.float32
    for dtype, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        worker = LLM(str(half), dtype=dtype).engine.executor.workers[0]
        assert worker.model.embed_out.weight.dtype == expected


def test_missing_shard_is_named(neox_sharded_checkpoint, tmp_path):
    ck = copy_checkpoint(neox_sharded_checkpoint, tmp_path)
    shard = sorted(ck.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        LLM(str(ck))


def test_corrupted_header_is_named(neox_checkpoint, tmp_path):
    ck = copy_checkpoint(neox_checkpoint, tmp_path)
    weights = ck / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"{not json at all, broken header!"
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM(str(ck))


def test_missing_and_unexpected_tensors_are_named(neox_checkpoint, tmp_path):
    ck = copy_checkpoint(neox_checkpoint, tmp_path)
    tensors = load_file(ck / "model.safetensors")
    del tensors["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"]
    tensors["gpt_neox.layers.1.mystery.weight"] = torch.zeros(3)
    save_file(tensors, ck / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        LLM(str(ck))
    message = str(info.value)
    assert "gpt_neox.layers.1.mlp.dense_h_to_4h.weight" in message and "gpt_neox.layers.1.mystery.weight" in message


def test_legacy_buffers_are_ignored(neox_hub_checkpoint):
    names = CheckpointFiles.open(neox_hub_checkpoint).tensor_files
    assert "gpt_neox.layers.0.attention.masked_bias" in names and "gpt_neox.layers.0.attention.rotary_emb.inv_freq" in names
    out = LLM(str(neox_hub_checkpoint)).generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 3


def test_pickle_weights_are_refused_and_convert_makes_safetensors(neox_checkpoint, tmp_path):
    pickled = pickle_source(neox_checkpoint, tmp_path / "pickled")
    # A LoRA adapter saved beside the pickle weights is not taken for the model's safetensors.
    save_file({"base_model.lora_A.weight": torch.zeros(2, 2)}, pickled / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="neo-serve convert"):
        LLM(str(pickled))
    converted = tmp_path / "converted"
    assert cli_main(["convert", str(pickled), str(converted)]) == 0
    assert (converted / "model.safetensors.index.json").is_file() and not list(converted.glob("*.bin"))
    assert greedy_tokens(converted) == greedy_tokens(neox_checkpoint)


def test_a_neox_head_saved_as_lm_head_loads(neox_checkpoint, tmp_path):
    # transformers 5 names GPT-NeoX's head `lm_head` in memory, so a checkpoint saved from its
    # state_dict holds lm_head.weight where the Hub's have embed_out.weight.
    renamed = tmp_path / "lm-head"
    shutil.copytree(neox_checkpoint, renamed)
    state = load_file(renamed / "model.safetensors")
    state["lm_head.weight"] = state.pop("embed_out.weight")
    save_file(state, renamed / "model.safetensors")
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=1)
    [ours], [reference] = (LLM(str(path), dtype="float32").generate([[5, 6, 7, 8]], params)
                           for path in (renamed, neox_checkpoint))
    assert ours.outputs[0].token_ids == reference.outputs[0].token_ids
    assert ours.outputs[0].logprobs == reference.outputs[0].logprobs


@pytest.mark.parametrize("family", ["neo", "neox"])
def test_a_tied_checkpoint_holding_only_the_heads_name_loads(family, neo_checkpoint, tokenizer, tmp_path):
    # Tied embeddings are one tensor: transformers saves it under the embedding's name, but
    # safetensors converters that keep one name of a shared tensor may keep the head's, and
    # transformers loads that too. Two stages: the first one's embedding comes from the head's name.
    from checkpoints import make_neox

    embedding, head = {"neo": ("transformer.wte.weight", "lm_head.weight"),
                       "neox": ("gpt_neox.embed_in.weight", "embed_out.weight")}[family]
    original = neo_checkpoint if family == "neo" else make_neox(tmp_path / "tied", tokenizer, tie_word_embeddings=True)
    head_only = tmp_path / "head-only"
    shutil.copytree(original, head_only)
    state = load_file(head_only / "model.safetensors")
    assert head not in state
    state[head] = state.pop(embedding)
    save_file(state, head_only / "model.safetensors")
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=1)
    [ours], [reference] = (LLM(str(path), dtype="float32", num_stages=2).generate([[5, 6, 7, 8]], params)
                           for path in (head_only, original))
    assert ours.outputs[0].token_ids == reference.outputs[0].token_ids
    assert ours.outputs[0].logprobs == reference.outputs[0].logprobs


@pytest.mark.parametrize("family", ["neo", "neox"])
def test_tied_embeddings_on_one_stage_are_one_tensor(family, neo_checkpoint, tokenizer, tmp_path):
    # As transformers keeps them: loaded twice and cast to the serving dtype, embedding and head
    # were two copies (257 MB more for GPT-Neo-2.7B in float16). The same output either way.
    from checkpoints import make_neox

    checkpoint = neo_checkpoint if family == "neo" else make_neox(tmp_path / "tied", tokenizer, tie_word_embeddings=True)
    config = load_model_config(checkpoint)
    [stage] = partition_layers(config, 1)
    model = load_stage(checkpoint, config, stage, dtype=torch.bfloat16)
    weights = dict(model.named_parameters(remove_duplicate=False))
    embedding, head = {"neo": ("transformer.wte.weight", "lm_head.weight"),
                       "neox": ("gpt_neox.embed_in.weight", "embed_out.weight")}[family]
    assert weights[head] is weights[embedding] and weights[head].dtype == torch.bfloat16
    # On two stages each holds its own end of the tie, read from the one stored tensor.
    first, last = (load_stage(checkpoint, config, spec, dtype=torch.bfloat16) for spec in partition_layers(config, 2))
    assert torch.equal(dict(first.named_parameters())[embedding], dict(last.named_parameters())[head])
    # Both names stored, as `neo-serve convert` writes a pickle checkpoint's tie: one tensor too;
    # a head of its own (untied weights) stays its own.
    for head_values, tied in ((lambda w: w.clone(), True), (lambda w: w + 1, False)):
        both = tmp_path / f"both-{tied}"
        shutil.copytree(checkpoint, both)
        state = load_file(both / "model.safetensors")
        state[head] = head_values(state[embedding])
        save_file(state, both / "model.safetensors")
        weights = dict(load_stage(both, config, stage, dtype=torch.bfloat16).named_parameters(remove_duplicate=False))
        assert (weights[head] is weights[embedding]) is tied
        assert torch.equal(weights[head], weights[embedding]) is tied
    reference = LLM(str(checkpoint), dtype="bfloat16", pack_cpu_linears=False)
    params = SamplingParams(max_tokens=8, temperature=0)
    two_stages = LLM(str(checkpoint), dtype="bfloat16", pack_cpu_linears=False, num_stages=2)
    assert (reference.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids
            == two_stages.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids)


def test_convert_writes_each_shard_as_it_fills(neox_checkpoint, tmp_path, monkeypatch):
    """A sharded pickle checkpoint converts one shard at a time: the first safetensors shard is
    on disk before the second pickle file is read (an init container converting GPT-NeoX-20B
    cannot hold the whole checkpoint), and the result serves the same tokens."""
    import neo_serve.convert as convert

    names = sorted(load_file(neox_checkpoint / "model.safetensors"))
    halves = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    pickled = pickle_source(neox_checkpoint, tmp_path / "pickled", weights={
        file: (lambda state, part=part: {name: state[name] for name in part}) for file, part in halves.items()})
    (pickled / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {name: file for file, part in halves.items() for name in part}}))
    events: list[str] = []
    load, save = convert._load_weights, convert.save_file
    monkeypatch.setattr(convert, "_load_weights", lambda file: events.append(f"load {file.name}") or load(file))
    monkeypatch.setattr(convert, "save_file", lambda *a, **k: events.append("save") or save(*a, **k))
    converted = tmp_path / "converted"
    convert.convert_checkpoint(pickled, converted, max_shard_bytes=64 * 1024)
    second_load = events.index("load pytorch_model-00002-of-00002.bin")
    assert "save" in events[:second_load], events
    shards = sorted(converted.glob("*.safetensors"))
    assert len(shards) > 2 and not list(converted.glob("*.partial"))
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert greedy_tokens(converted) == greedy_tokens(neox_checkpoint)


def test_convert_refuses_pickled_code(tmp_path, capsys):
    src = tmp_path / "evil"
    src.mkdir()

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"weight": Payload()}, src / "pytorch_model.bin")
    assert cli_main(["convert", str(src), str(tmp_path / "out")]) == 2  # refused, said in one line
    err = capsys.readouterr()
    assert err.err.startswith("neo-serve convert: ") and "weights_only" in err.err and "pwned" not in err.out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("bf16_kernels, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_auto_keeps_bfloat16_on_a_cpu_only_with_its_kernels(neox_checkpoint, monkeypatch, bf16_kernels, expected):
    import neo_serve.loader as loader

    config = dataclasses.replace(load_model_config(neox_checkpoint), checkpoint_dtype="bfloat16")
    monkeypatch.setattr(loader, "cpu_has_bfloat16_kernels", lambda: bf16_kernels)
    assert resolve_dtype("auto", config, None, "cpu") == expected
    assert resolve_dtype("auto", config, None, "cuda") == torch.bfloat16
    assert resolve_dtype("float16", config, None, "cpu") == torch.float16  # an explicit dtype is kept
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", config, None, "cpu")


def test_convert_takes_the_weights_out_of_a_training_checkpoint(neox_checkpoint, tmp_path):
    # A trainer's checkpoint nests the state dict beside its step count; its training_args.bin
    # is no weights file (and weights_only refuses its objects).
    src = pickle_source(neox_checkpoint, tmp_path / "trained", weights={
        "model_weights.bin": lambda state: {"state_dict": state, "step": 1200},
        "training_args.bin": {"learning_rate": 1e-4}})
    converted = tmp_path / "converted"
    assert cli_main(["convert", str(src), str(converted)]) == 0
    assert greedy_tokens(converted) == greedy_tokens(neox_checkpoint)


@pytest.mark.parametrize("case", ["no tensors", "no config", "bad index", "missing shard", "dst is a file"])
def test_convert_fails_naming_what_is_wrong_and_reports_no_success(case, neox_checkpoint, tmp_path, capsys):
    dst = tmp_path / "out"
    if case == "no tensors":
        src = pickle_source(neox_checkpoint, tmp_path / "src", weights={"pytorch_model.bin": {"step": 3, "lr": 0.1}})
        expected = ["pytorch_model.bin", "no tensors", "'step'"]
    elif case == "no config":  # weights alone convert, but the result could not be served
        src = pickle_source(neox_checkpoint, tmp_path / "src", with_meta=False)
        expected = ["cannot be served", "config.json"]
    elif case == "bad index":
        src = pickle_source(neox_checkpoint, tmp_path / "src")
        (src / "pytorch_model.bin.index.json").write_text('{"metadata": {}}')
        expected = ["pytorch_model.bin.index.json", "weight_map"]
    elif case == "missing shard":
        src = pickle_source(neox_checkpoint, tmp_path / "src")
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
            "a": "pytorch_model.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
        expected = ["missing", "pytorch_model-00002-of-00002.bin"]
    else:
        src = pickle_source(neox_checkpoint, tmp_path / "src")
        dst.write_text("a file where the output directory should go")
        expected = [str(dst), "not a directory"]
    assert cli_main(["convert", str(src), str(dst)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("neo-serve convert: ") and "Traceback" not in captured.err
    for text in expected:
        assert text in captured.err, (text, captured.err)
    assert "wrote" not in captured.out
    if case in ("no tensors", "bad index", "missing shard"):  # refused before writing anything
        assert not dst.exists()


def test_converting_again_into_the_same_directory_leaves_no_stale_shards(neox_checkpoint, tmp_path):
    import neo_serve.convert as convert

    src = pickle_source(neox_checkpoint, tmp_path / "src")
    dst = tmp_path / "out"
    convert.convert_checkpoint(src, dst, max_shard_bytes=64 * 1024)
    assert len(list(dst.glob("model-*.safetensors"))) > 2
    (dst / "model-00009.safetensors.partial").write_bytes(b"left by a killed conversion")
    convert.convert_checkpoint(src, dst)
    assert sorted(p.name for p in dst.iterdir() if "safetensors" in p.name) == [
        "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert greedy_tokens(dst) == greedy_tokens(neox_checkpoint)


def test_an_empty_index_is_refused_by_name(neox_sharded_checkpoint, tmp_path):
    ck = copy_checkpoint(neox_sharded_checkpoint, tmp_path)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="no tensors"):
        LLM(str(ck))


def test_a_weight_beyond_float16s_range_is_refused_when_serving_in_float16(neox_checkpoint, tmp_path):
    # Cast to float16 it would be inf, and every logit after it NaN.
    ck = copy_checkpoint(neox_checkpoint, tmp_path)
    tensors = {name: t.to(torch.bfloat16) for name, t in load_file(ck / "model.safetensors").items()}
    tensors["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"][0, 0] = 1e5
    save_file(tensors, ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"gpt_neox\.layers\.0\.mlp\.dense_4h_to_h\.weight.*bfloat16 or float32"):
        LLM(str(ck), dtype="float16")
    LLM(str(ck), dtype="bfloat16")  # in range there


@pytest.mark.parametrize("family", ["neox", "neo"])
def test_loading_a_stage_does_not_import_torchs_compiler(family, neox_checkpoint, neo_checkpoint):
    """A stage is built on the meta device and filled from the checkpoint; initialising the
    embeddings' meta weights ran torch's Python decomposition of `normal_`, which imports
    torch._dynamo: 2-3 s of CPU in every stage actor, pipeline replica and offline engine
    (loading a small stage took 3.1 s, now 0.1 s). In a fresh process: this one may have it."""
    import subprocess
    import sys

    checkpoint = neox_checkpoint if family == "neox" else neo_checkpoint
    script = ("import sys; from neo_serve import LLM, SamplingParams; "
              f"llm = LLM({str(checkpoint)!r}, num_stages=2, dtype='float32'); "
              "out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0)); "
              "assert len(out[0].outputs[0].token_ids) == 2; "
              "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]", ran.stdout

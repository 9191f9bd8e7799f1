"""build_app's arguments, the deployment options they make and the Serve configs in deploy/ (no cluster)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from checkpoints import build_tokenizer, make_neox
from serve_configs import SHIPPED_CONFIGS, load_serve_config, scaled_app_args
from neo_serve.app import build_app
from neo_serve.config import load_model_config
from neo_serve.models.attention import FlashAttentionBackend
from neo_serve.plan import plan_pipeline
from neo_serve.serve.config import (DEMO_CHECKPOINT, AppArgs, AppConfigError, AutoscalingArgs, ModelArgs, RouterArgs,
                                    deployment_name, parse_app_args)
from neo_serve.serve.launcher import (add_up_arguments, api_keys_line, app_args_from_namespace, gpu_shortfall,
                                      local_cpu_threads, local_num_cpus, threads_per_stage)
from neo_serve.serve.machine import available_cores, cgroup_cpu_limit

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"  # ../shared beside the clone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(make_neox(tmp_path_factory.mktemp("cfg") / "tiny", build_tokenizer()))


@pytest.mark.parametrize("args, field", [
    ({"models": [{"num_stages": 0}]}, "models[0].num_stages"),
    ({"models": [{"dtype": "float8"}]}, "models[0].dtype"),
    ({"models": []}, "models"),
    ({"models": [{"kv_cache_tokens": -5}]}, "models[0].kv_cache_tokens"),
    ({"models": [{"num_replicas": 2, "autoscaling": {"max_replicas": 3}}]}, "models[0]"),
    ({"models": [{"autoscaling": {"min_replicas": 4, "max_replicas": 2}}]}, "models[0].autoscaling"),
    # Reports as far apart as the period averaged over leave nothing to average.
    ({"models": [{"autoscaling": {"max_replicas": 2, "metrics_interval_s": 5, "look_back_period_s": 5}}]},
     "models[0].autoscaling"),
    ({"router": {"autoscaling": {"max_replicas": 2, "metrics_interval_s": 30}}}, "router.autoscaling"),
    ({"models": [{"unknown_option": 1}]}, "models[0].unknown_option"),
    ({"router": {"num_replicas": 0}}, "router.num_replicas"),
    ({"num_stages": "two"}, "models[0].num_stages"),
    ({"models": [{"max_stream_chunks_per_s": 0}]}, "models[0].max_stream_chunks_per_s"),
    ({"models": [{"stream_interval_s": -1}]}, "models[0].stream_interval_s"),
    ({"models": [{"max_queued_requests": 0}]}, "models[0].max_queued_requests"),
    ({"router": {"resources": {"GPU": 1}}}, "router.resources"),
    ({"playground": {"resources": {"neo-serve-ingress": 0}}}, "playground.resources"),
    ({"router": {"resources": {"neo-serve-ingress": 1.5}}}, "router.resources"),
    # An autoscaling target a replica can never reach would never add a replica.
    ({"models": [{"max_ongoing_requests": 8, "autoscaling": {"max_replicas": 2}}]}, "models[0]"),
    ({"router": {"max_ongoing_requests": 4, "autoscaling": {"max_replicas": 2, "target_ongoing_requests": 5}}},
     "router"),
    ({"attention_backend": "flash"}, "models[0]"),  # flash-attn on a CPU deployment: at build, not at load
])
def test_bad_args_name_the_field(args, field):
    with pytest.raises(AppConfigError) as excinfo:
        build_app(args)
    assert f"  {field}:" in str(excinfo.value)


def test_checkpoint_problems_fail_at_build_time(checkpoint, tmp_path):
    with pytest.raises(AppConfigError, match=r"models\[0\] \(missing\)\.checkpoint"):
        build_app({"checkpoint": str(tmp_path / "missing")})
    with pytest.raises(AppConfigError, match=r"models\[0\] \(tiny\)\.num_stages"):
        build_app({"checkpoint": checkpoint, "num_stages": 5})  # 4 layers
    with pytest.raises(AppConfigError, match=r"kv_cache_tokens"):
        build_app({"checkpoint": checkpoint, "kv_cache_tokens": 64})  # < max_model_len 512
    with pytest.raises(AppConfigError, match="unique"):
        build_app({"models": [{"checkpoint": checkpoint}, {"checkpoint": checkpoint}]})
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoint, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(AppConfigError, match="tokenizer"):
        build_app({"checkpoint": str(no_tokenizer)})


def test_flat_args_and_defaults(checkpoint):
    args = parse_app_args({"checkpoint": checkpoint, "num_stages": "2"})  # `serve run ... num_stages=2`
    [model] = args.models
    assert model.served_name == "tiny" and model.num_stages == 2
    demo = parse_app_args(None).models[0]
    assert demo.checkpoint_path == str(DEMO_CHECKPOINT) and demo.served_name == "neo-demo"
    assert build_app({"checkpoint": checkpoint, "num_stages": 2}) is not None


def test_each_replica_draws_its_own_seed_unless_one_is_set(checkpoint):
    """Every pipeline replica builds its engine from the same args: with one fixed seed, the first
    unseeded request on each fresh replica (autoscaling, a restart) sampled the same tokens."""
    [model] = parse_app_args({"checkpoint": checkpoint}).models
    seeds = {model.engine_config().seed for _ in range(4)}  # as four replicas would
    assert len(seeds) == 4
    [fixed] = parse_app_args({"checkpoint": checkpoint, "seed": 7}).models
    assert {fixed.engine_config().seed for _ in range(2)} == {7}


def test_placement_bundles_and_actor_options():
    cpu = ModelArgs(num_stages=3)
    assert cpu.placement_bundles() == [{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert cpu.replica_actor_options() == {"num_cpus": 1, "num_gpus": 0}
    assert cpu.stage_resources() == {"num_cpus": 1.0, "num_gpus": 0}
    gpu = ModelArgs(num_stages=2, use_gpu=True)
    assert gpu.placement_bundles() == [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert gpu.replica_actor_options() == {"num_cpus": 1, "num_gpus": 0}  # the stages hold the GPUs
    assert gpu.engine_config().device == "cuda"
    single = ModelArgs(use_gpu=True)
    assert single.placement_bundles() == [{"CPU": 1.0, "GPU": 1.0}]
    assert single.replica_actor_options() == {"num_cpus": 1.0, "num_gpus": 1}  # runs the model itself
    assert ModelArgs(autoscaling={"max_replicas": 4}).scaling_options() == {
        "num_replicas": None, "autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                                     "target_ongoing_requests": 16.0}}
    assert ModelArgs().scaling_options() == {"num_replicas": 1}


def test_field_descriptions_document_every_arg():
    for model in (AppArgs, ModelArgs, RouterArgs, AutoscalingArgs):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_deploy_configs_are_valid(path):
    config = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    [application] = schema.applications
    assert application.import_path == "neo_serve.app:build_app"
    args = parse_app_args(application.args)
    for model in args.models:
        if model.checkpoint is None:
            # The demo runs as is: build the whole app. The CPUs its comment tells users to start
            # Ray with must hold the app at its largest.
            assert DEMO_CHECKPOINT.is_dir()
            build_app(application.args)
            [num_cpus] = re.findall(r"ray start --head --num-cpus (\d+)", path.read_text())
            reserved = scaled_app_args(config["applications"][0]).cpus_reserved()  # at the overrides' max_replicas
            assert int(num_cpus) >= reserved, f"{path.name} tells users to start Ray with too few CPUs"
            continue
        assert model.use_gpu and model.dtype == "float16"
        # The real checkpoints are not here; check the shape against the published config.
        reference = REFERENCE / f"{model.served_name}.config.json"
        config_json = json.loads(reference.read_text())
        layers = config_json.get("num_hidden_layers") or config_json["num_layers"]
        assert layers % model.num_stages == 0
        assert model.kv_cache_tokens >= config_json["max_position_embeddings"]
        # Where flash-attn runs, each running sequence holds at least one of its 256-slot pages:
        # a max_num_seqs past the pages is a promise the engine cannot keep.
        pages = model.kv_cache_tokens // FlashAttentionBackend.PAGE_MULTIPLE
        assert model.max_num_seqs <= pages, f"{path.name}: max_num_seqs {model.max_num_seqs} > {pages} pages"
        # The cache fits beside the weights on the GPU the comment sizes it for.
        for gpus, memory in re.findall(r"neo-serve plan --config \S+ --gpus (\d+) --gpu-memory (\S+)", path.read_text()):
            plan = plan_pipeline(load_model_config(reference), num_stages=int(gpus), gpu_memory=memory,
                                 dtype=model.dtype)
            assert plan.fits and model.kv_cache_tokens <= plan.kv_tokens, f"{path.name}: {plan.kv_tokens} tokens fit"
        # A hung CUDA call must end in a restart (or a replaced replica), not streams stalled forever.
        assert model.step_timeout_s is not None, f"{path.name}: a GPU model without step_timeout_s"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scaling_edits_of_the_shipped_configs_keep_the_app_running(path):
    """Each pipeline and autoscaled router is scaled by a `deployments:` entry, not by args: Serve
    applies an edit of its values to the running replicas, while an edit of args (or an entry with
    an autoscaling_config added or removed, which changes the app's code version in Serve 2.60)
    replaces every replica of the app, reloading every model's weights (checked live on a cluster:
    0 of 5 replica processes survived adding such an entry to the demo's RayService)."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    config = load_serve_config(path)
    for app in config["applications"]:
        args = parse_app_args(app.get("args") or {})
        overrides = {d["name"]: d for d in app.get("deployments") or []}
        for model in args.models:
            name = deployment_name(model, args.models)
            assert model.autoscaling is None, f"{path.name}: {model.served_name}'s autoscaling belongs in deployments:"
            assert overrides.get(name, {}).get("autoscaling_config"), \
                f"{path.name}: no deployments: entry scales {name}"
        assert args.router.autoscaling is None, f"{path.name}: the router's autoscaling belongs in deployments:"
        scaled = scaled_app_args(app)  # the bounds are valid as the args' own (target under max_ongoing_requests)
        assert all(model.autoscaling is not None for model in scaled.models)

        def version(app_config: dict) -> str:
            return get_app_code_version(ServeApplicationSchema.model_validate(app_config))

        rescaled = copy.deepcopy(app)
        for override in rescaled["deployments"]:
            if override.get("autoscaling_config"):
                bounds = override["autoscaling_config"]
                bounds.update(min_replicas=bounds.get("min_replicas", 1) + 1, max_replicas=bounds["max_replicas"] + 1,
                              target_ongoing_requests=bounds.get("target_ongoing_requests", 2) / 2)
        assert version(rescaled) == version(app), f"{path.name}: a scaling edit would replace every replica"
        # Adding an entry with an autoscaling_config (here the playground's, or a second router
        # entry's), or switching one to num_replicas, would restart everything: Serve hashes the
        # list of them (k8s/README.md says so).
        added = copy.deepcopy(app)
        added["deployments"].append({"name": "Playground", "autoscaling_config": {"max_replicas": 1}})
        assert version(added) != version(app)
        switched = copy.deepcopy(app)
        switched["deployments"][0] = {"name": switched["deployments"][0]["name"], "num_replicas": 1}
        assert version(switched) != version(app)
        # The same edit made in args would restart everything: Serve hashes args whole.
        moved = copy.deepcopy(app)
        pipeline = deployment_name(args.models[0], args.models)
        [bounds] = [o["autoscaling_config"] for o in rescaled["deployments"] if o["name"] == pipeline]
        moved["args"]["models"][0]["autoscaling"] = bounds
        moved["deployments"] = [o for o in moved["deployments"] if o["name"] != pipeline]
        assert version(moved) != version(app)


def test_expected_deploy_files():
    names = {p.name for p in DEPLOY.iterdir()}
    assert {"demo-cpu.yaml", "gpt-neox-20b-2gpu.yaml", "gpt-neox-20b-4gpu.yaml", "gpt-neo-2.7b-1gpu.yaml",
            "Dockerfile"} <= names
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311${RAY_IMAGE_SUFFIX}" in dockerfile


def test_up_arguments_make_app_args():
    parser = argparse.ArgumentParser()
    add_up_arguments(parser)
    args = app_args_from_namespace(parser.parse_args(["/m/a", "/m/b", "--stages", "2", "--autoscale", "1:4",
                                                      "--dtype", "float16", "--name", "a", "--name", "b"]))
    assert args == {"models": [
        {"checkpoint": "/m/a", "name": "a", "num_stages": 2, "dtype": "float16", "use_gpu": False,
         "autoscaling": {"min_replicas": 1, "max_replicas": 4}},
        {"checkpoint": "/m/b", "name": "b", "num_stages": 2, "dtype": "float16", "use_gpu": False,
         "autoscaling": {"min_replicas": 1, "max_replicas": 4}}]}
    demo = app_args_from_namespace(parser.parse_args(["--replicas", "3"]))
    assert demo == {"models": [{"num_stages": 1, "dtype": "auto", "use_gpu": False, "num_replicas": 3}]}
    threads = app_args_from_namespace(parser.parse_args(["--cpus-per-stage", "4"]))
    assert threads["models"][0]["cpus_per_stage"] == 4.0
    # A relative directory is the one `neo-serve up` was started in, whatever the workers' directory.
    relative = app_args_from_namespace(parser.parse_args(["ckpt", "./runs/../m/.", "~/m"]))
    assert [m["checkpoint"] for m in relative["models"]] == [
        os.path.join(os.getcwd(), "ckpt"), os.path.join(os.getcwd(), "m"), os.path.join(os.path.expanduser("~"), "m")]


def test_up_on_a_local_cpu_cluster_gives_the_stages_the_machines_threads():
    parser = argparse.ArgumentParser()
    add_up_arguments(parser)

    def per_stage(*argv: str, threads: int | None) -> list:
        app = app_args_from_namespace(parser.parse_args(list(argv)), cpu_threads=threads)
        return [m.get("cpus_per_stage") for m in app["models"]]

    # One stage of one replica takes them all; stages and replicas (at most, when autoscaling) share.
    assert per_stage(threads=2) == [2]
    assert per_stage("--stages", "2", threads=2) == [1]
    assert per_stage("--replicas", "2", threads=2) == [1]
    assert per_stage("/m/a", "/m/b", "--autoscale", "1:2", threads=7) == [1, 1]
    assert per_stage("/m/a", "/m/b", threads=7) == [3, 3]
    assert per_stage("--stages", "3", threads=2) == [1]  # at least one each
    with pytest.raises(AppConfigError, match=r"models\[0\]\.num_stages"):  # named, not a ZeroDivisionError
        parse_app_args(app_args_from_namespace(parser.parse_args(["--stages", "0"]), cpu_threads=2))
    # An explicit --cpus-per-stage wins; a GPU stage and a joined cluster keep the app's 1 CPU.
    assert per_stage("--cpus-per-stage", "4", threads=2) == [4.0]
    assert per_stage("--gpu", threads=8) == [None]
    assert per_stage(threads=None) == [None]
    assert threads_per_stage(15, 2, 3) == 2

    # torch's threads, at most the usable cores, one left to Serve and Ray above two.
    assert local_cpu_threads(2, torch_threads=2) == 2
    assert local_cpu_threads(1, torch_threads=2) == 1
    assert local_cpu_threads(16, torch_threads=8) == 7  # physical cores of a laptop with SMT
    assert local_cpu_threads(4, torch_threads=32) == 3  # a container allowed 4 of a host's cores
    assert local_cpu_threads(3, torch_threads=1) == 1  # OMP_NUM_THREADS=1


@pytest.mark.parametrize("files, limit, cores", [
    ({"cpu.max": "100000 100000\n"}, 1.0, 1),  # cgroup v2: `docker run --cpus 1`, a Pod's limit of 1
    ({"cpu.max": "150000 100000\n"}, 1.5, 1),  # whole cores, as Ray counts a quota (truncated)
    ({"cpu.max": "50000 100000\n"}, 0.5, 1),  # at least one
    ({"cpu.max": "max 100000\n"}, None, None),  # no quota: the affinity mask
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, None),
    ({"cpu.max": "garbled\n"}, None, None),
    ({}, None, None),  # no cgroup files at all (macOS, a host without the controller)
])
def test_a_containers_cpu_quota_caps_the_cores_neo_serve_up_uses(tmp_path, files, limit, cores):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(str(tmp_path)) == limit
    mask = len(os.sched_getaffinity(0))
    assert mask >= 2  # these machines have 2 cores: a quota of 1 is below the mask
    # Under a quota the stages take the quota's cores, not the machine's (a 2-CPU quota on a
    # 64-core host: 2 threads, not 63).
    assert available_cores(str(tmp_path)) == (mask if cores is None else cores)


def test_up_says_when_the_api_wants_keys(monkeypatch):
    monkeypatch.delenv("NEO_SERVE_API_KEYS", raising=False)
    assert api_keys_line(RouterArgs()) is None
    monkeypatch.setenv("NEO_SERVE_API_KEYS", "k1,k2")
    assert api_keys_line(RouterArgs()) == ("  api keys     on (NEO_SERVE_API_KEYS): send Authorization: Bearer <key>; "
                                           "the playground asks for one")


def test_up_refuses_gpu_pipelines_a_local_ray_cannot_place():
    two_models = parse_app_args({"models": [
        {"name": "a", "use_gpu": True, "num_stages": 2, "num_replicas": 2},
        {"name": "b", "use_gpu": True, "autoscaling": {"min_replicas": 1, "max_replicas": 4}},
        {"name": "cpu"}]})
    assert gpu_shortfall(two_models, 5) is None  # 2 x 2 + 1 (autoscaling starts at min_replicas)
    problem = gpu_shortfall(two_models, 4)
    assert problem.startswith("the app starts with pipelines needing 5 GPU(s) (a: 2 pipeline(s) x 2 (--stages 2), "
                              "b: 1 pipeline(s) x 1 (--stages 1);") and "Ray sees 4 on this machine" in problem
    assert "Ray sees no GPU" in gpu_shortfall(two_models, 0)
    scaled_to_zero = parse_app_args({"models": [{"use_gpu": True, "autoscaling": {"min_replicas": 0,
                                                                                  "max_replicas": 2}}]})
    assert gpu_shortfall(scaled_to_zero, 0) is None  # nothing to place until a request comes
    assert gpu_shortfall(parse_app_args({}), 0) is None  # the CPU demo


def test_a_local_ray_has_room_for_every_replica_the_app_reserves():
    parser = argparse.ArgumentParser()
    add_up_arguments(parser)

    def reserved(*argv: str) -> AppArgs:
        return parse_app_args({**app_args_from_namespace(parser.parse_args(list(argv))), "verify_checkpoints": False})

    # Two 1-CPU replicas and the 1-CPU router do not fit 2 cores: Ray is told 3 logical CPUs.
    two = reserved("--replicas", "2")
    assert two.cpus_reserved() == 3.0
    assert local_num_cpus(two, None, cores=2) == 3
    assert local_num_cpus(two, None, cores=8) is None  # Ray counts the cores itself
    assert local_num_cpus(two, 2, cores=2) == 2  # --num-cpus wins
    # Autoscaling reserves its max; a pipeline of 2 stages has 2 bundles plus the replica's CPU.
    assert reserved("--stages", "2", "--autoscale", "1:3").cpus_reserved() == 3 * 3 + 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--replicas", "2", "--autoscale", "1:2"])
    with pytest.raises(AppConfigError, match="MIN:MAX"):
        app_args_from_namespace(parser.parse_args(["--autoscale", "4"]))


def test_stream_chunk_budget_auto_follows_the_device():
    # On CPU every chunk's wake-ups take cores from the model: a smaller budget (measured, see
    # docs/benchmarks.md); with GPUs the model does not share its cores with the streams.
    assert ModelArgs().stream_chunk_budget() == 64.0
    assert ModelArgs(use_gpu=True).stream_chunk_budget() == 256.0
    assert ModelArgs(max_stream_chunks_per_s=10).stream_chunk_budget() == 10.0
    assert ModelArgs(max_stream_chunks_per_s=None).stream_chunk_budget() is None


def test_a_key_file_without_keys_is_refused_rather_than_leaving_the_api_open(tmp_path, monkeypatch):
    from neo_serve.serve.access import load_api_keys

    keys = tmp_path / "api-keys"
    keys.write_text("first\n\n  second  \n")
    assert load_api_keys(None, str(keys)) == (b"first", b"second")
    for empty in ("", "\n  \n"):
        keys.write_text(empty)
        with pytest.raises(ValueError, match="api_keys_file: .* holds no keys"):
            load_api_keys(None, str(keys))
    # An unset or empty variable is no key source at all (the default variable is always named).
    monkeypatch.setenv("NEO_SERVE_API_KEYS", "")
    assert load_api_keys("NEO_SERVE_API_KEYS", None) == ()


def test_a_models_deployment_is_named_by_its_served_name_alone():
    """Adding, removing or reordering other models must not rename a model's pipeline deployment:
    Serve deletes a renamed deployment and creates it anew (every replica at once, weights
    reloaded), and a config's `deployments:` override naming it would fail the whole deploy."""
    from ray.serve._private.build_app import build_app as build_graph

    def pipelines(*names: str) -> dict[str, str]:
        args = {"models": [{"name": name} for name in names], "playground": False}
        graph = build_graph(build_app(args), name="x")
        built = {d.name for d in graph.deployments} - {"Router"}
        expected = {name: deployment_name(model, parse_app_args(args).models) for name, model in
                    zip(names, parse_app_args(args).models)}
        assert set(expected.values()) == built
        return expected

    both = pipelines("alpha", "beta")
    assert both == {"alpha": "Pipeline-alpha", "beta": "Pipeline-beta"}
    assert pipelines("beta") == {"beta": "Pipeline-beta"}
    assert pipelines("gamma", "beta", "alpha") == {"gamma": "Pipeline-gamma", **both}
    # Names Serve cannot take are slugged; two that would meet get a digest of the served name.
    apart = pipelines("my model", "my/model")
    assert len(set(apart.values())) == 2 and all(re.fullmatch(r"Pipeline-my-model-[0-9a-f]{8}", n) for n in apart.values())
    assert pipelines("my model") == {"my model": "Pipeline-my-model"}


def test_a_checkpoint_that_does_not_exist_says_so():
    # It said "no config.json at /nonexistent/x", as for a directory without one.
    with pytest.raises(AppConfigError, match=r"models\[0\] \(x\)\.checkpoint: /nonexistent/x does not exist \("):
        build_app({"checkpoint": "/nonexistent/x"})

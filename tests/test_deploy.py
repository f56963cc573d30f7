"""deploy/: the Ray cluster YAML passes the checks `ray up` runs on it (Ray's own
`prepare_config` and `validate_config`, its JSON schema included), and both it and the
KubeRay manifest give the stack what it asks Ray for: `edge` slots on CPU workers,
`cloud` slots with a GPU on verifier workers, none on the head, node labels the
registry can hold, one Redis every node reaches, images of the same architecture and
Python. The `edgecloud up` command they document parses with the real CLI."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.cli import build_parser
from orchestrator.registry import check_labels

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
# AWS families with a `g` after the generation are Graviton (arm64): c7g, m7gd, r8g...
ARM64_INSTANCE = re.compile(r"^[a-z]+\d+g[a-z]*\.")


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def kuberay() -> dict[str, dict]:
    docs = yaml.safe_load_all((DEPLOY / "kuberay.yaml").read_text())
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_the_cluster_yaml_passes_ray_ups_own_checks(cluster):
    prepared = prepare_config(cluster)  # ray up: defaults merged, docker checked
    validate_config(prepared)  # ray up: the JSON schema and the node types


def test_node_types_offer_what_the_stack_asks_for(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not {"edge", "cloud"} & set(head["resources"]), "no model may land on the head"
    assert types["edge"]["resources"]["edge"] >= 1
    verifier = types["verifier"]["resources"]
    assert verifier["cloud"] == 1 and verifier["GPU"] >= 1  # the stack's {"cloud": 1, GPU: 1}
    assert types["verifier"]["min_workers"] == 0, "verifiers are added on demand"
    for name, node_type in types.items():
        labels = node_type.get("labels", {})
        assert check_labels(f"{name}.labels", labels) == dict(sorted(labels.items()))
        if name != cluster["head_node_type"]:
            assert {"region", "tier"} <= set(labels), f"{name}: the router filters on these"


def test_images_match_the_instances_and_python(cluster):
    images = [cluster["docker"]["image"]] + [
        t["docker"]["worker_image"]
        for t in cluster["available_node_types"].values()
        if "docker" in t
    ]
    assert all(re.search(r"-py311-(cpu|gpu)$", image) for image in images), images
    ray_versions = {image.split(":")[1].split("-")[0] for image in images}
    assert len(ray_versions) == 1, f"one Ray version across the images: {ray_versions}"
    assert cluster["available_node_types"]["verifier"]["docker"]["worker_image"].endswith("-gpu")
    for name, node_type in cluster["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        assert not ARM64_INSTANCE.match(instance), f"{name}: {instance} is arm64, images x86"


def test_every_node_installs_the_package_and_the_head_runs_one_redis(cluster):
    dist = next(path for path in cluster["file_mounts"] if path.endswith("/dist"))
    assert any(f"pip install --quiet {dist}/edgecloud-" in c for c in cluster["setup_commands"])
    assert not any("example.invalid" in c for c in cluster["setup_commands"])
    redis = " ".join(cluster["head_start_ray_commands"])
    assert "bind 0.0.0.0" in redis and "requirepass" in redis and "port 6380" in redis


def documented_up(text: str) -> list[str]:
    """The `edgecloud up --ray-address ...'` command in a file's comments, as argv after
    `edgecloud` (up to the quote that closes `ray exec`'s command)."""
    lines = [line.lstrip("# ").rstrip("\\").strip() for line in text.splitlines()]
    joined = " ".join(lines)
    start = joined.index("edgecloud up --ray-address")
    return shlex.split(joined[start : joined.index("'", start)])[1:]


def test_the_documented_up_command_parses(cluster, tmp_path):
    argv = documented_up((DEPLOY / "cluster.yaml").read_text())
    args = build_parser().parse_args(argv)
    assert args.ray_address == "auto" and args.verifiers >= 1 and args.host == "0.0.0.0"
    assert not any(a.startswith("redis://") for a in argv), "the password stays off argv"


def test_kuberay_groups_offer_what_the_stack_asks_for(kuberay):
    ray_cluster = kuberay["RayCluster/edgecloud"]
    assert ray_cluster["apiVersion"] == "ray.io/v1"
    spec = ray_cluster["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"edge", "verifier"}

    def resources(group: dict) -> dict:
        return json.loads(json.loads(group["rayStartParams"]["resources"]))

    def labels(group: dict) -> dict:
        pairs = group["rayStartParams"]["labels"].split(",")
        return check_labels("labels", dict(p.split("=", 1) for p in pairs))

    assert resources(groups["edge"])["edge"] >= 1
    assert resources(groups["verifier"]) == {"cloud": 1}
    assert groups["verifier"]["rayStartParams"]["num-gpus"] == "1"
    assert groups["verifier"]["minReplicas"] == 0
    [gpu_container] = groups["verifier"]["template"]["spec"]["containers"]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_container["image"].endswith("-gpu")
    for group in groups.values():
        assert {"region", "tier"} <= set(labels(group))


def test_kuberay_pods_reach_one_redis_by_its_service(kuberay):
    service = kuberay["Service/edgecloud-redis"]
    port = service["spec"]["ports"][0]["port"]
    [head] = kuberay["RayCluster/edgecloud"]["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in head["env"]}
    assert env["EDGECLOUD_REDIS_URL"]["value"] == (
        f"redis://:$(REDIS_PASSWORD)@{service['metadata']['name']}:{port}/0"
    )
    assert "secretKeyRef" in env["REDIS_PASSWORD"]["valueFrom"]
    [redis] = kuberay["Deployment/edgecloud-redis"]["spec"]["template"]["spec"]["containers"]
    assert "--requirepass" in redis["command"][-1] and "secretKeyRef" in str(redis["env"])

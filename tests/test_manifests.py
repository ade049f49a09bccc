"""The Kubernetes manifests, checked offline: what `kubectl apply -k k8s/overlays/{cpu,gpu}` would send is valid for
KubeRay's CRDs and Kubernetes' schemas, its Serve config is valid for Ray Serve, and everything it names exists in the
repository. The planted-mistake tests show that each check fails when it should (helpers: tests/k8s_check.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_check import (
    RAY_KINDS,
    REPO,
    RenderError,
    builtin_errors,
    entrypoint_errors,
    load_documents,
    pod_specs,
    ray_object_errors,
    render,
    serve_config_errors,
)

K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
SECRETS_TEMPLATE = K8S / "secrets.template.yaml"

@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return copy.deepcopy(found)


def worker_groups(obj: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = obj["spec"].get("rayClusterSpec") or obj["spec"]["rayClusterConfig"]
    return cluster["workerGroupSpecs"]


# ---------------------------------------------------------------------------------------------------------------------
# The shipped manifests


def test_both_overlays_deploy_the_pipeline_the_endpoint_mlflow_and_storage(rendered):
    for objects in rendered.values():
        assert sorted((obj["kind"], obj["metadata"]["name"]) for obj in objects) == [
            ("Deployment", "crlft-mlflow"),
            ("Namespace", "crlft"),
            ("PersistentVolumeClaim", "crlft-mlflow"),
            ("PersistentVolumeClaim", "crlft-state"),
            ("RayJob", "crlft-pipeline"),
            ("RayService", "crlft-chat"),
            ("Service", "crlft-mlflow"),
        ]
        assert all(obj["metadata"].get("namespace") == "crlft" for obj in objects if obj["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_objects_match_the_crd_schemas_with_unknown_fields_refused(rendered, overlay):
    ray_objects = [obj for obj in rendered[overlay] if obj["kind"] in RAY_KINDS]
    assert ray_objects
    for obj in ray_objects:
        assert ray_object_errors(obj) == [], obj["kind"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_match_the_kubernetes_schemas(rendered, overlay):
    for obj in rendered[overlay]:
        if obj["kind"] not in RAY_KINDS:
            assert builtin_errors(obj) == [], obj["kind"]


def test_the_secrets_template_is_valid_and_holds_only_placeholders():
    secrets = load_documents(SECRETS_TEMPLATE)
    assert {s["metadata"]["name"] for s in secrets} == {"crlft-ray-auth", "crlft-api", "crlft-mlflow"}
    for secret in secrets:
        assert builtin_errors(secret) == []
        assert set(secret["stringData"].values()) == {"REPLACE_ME"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_valid_for_ray_serve_and_names_code_that_exists(rendered, overlay):
    service = one(rendered[overlay], "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert [app["import_path"] for app in config["applications"]] == ["services.chat:build_app"]
    assert serve_config_errors(service["spec"]["serveConfigV2"], REPO) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_endpoint_serves_adapters_on_their_base_as_its_comment_says(rendered, overlay):
    """The commented variant of the application's args (adapters listed, no model) is a valid Serve config too."""
    service = one(rendered[overlay], "RayService")
    comment = (K8S / "base" / "rayservice-chat.yaml").read_text()
    listed = yaml.safe_load("\n".join(line.split("#", 1)[1][3:] for line in comment.splitlines()
                                      if line.strip().startswith("#   ")))  # fmt: skip
    assert listed == {"serve.adapters": ["support-de", "support-fr"], "inference.engine": "vllm"}
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    args = config["applications"][0]["args"]
    del args["model"]
    args["overrides"].update(listed)
    assert serve_config_errors(yaml.safe_dump(config), REPO) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_runs_the_pipeline_module_of_this_repository_with_flags_it_defines(rendered, overlay):
    job = one(rendered[overlay], "RayJob")
    assert job["spec"]["entrypoint"].startswith("python -m jobs.pipeline ")
    assert entrypoint_errors(job["spec"]["entrypoint"], REPO) == []


def test_runtime_envs_are_valid_ray_runtime_envs(rendered):
    from ray.runtime_env import RuntimeEnv

    for objects in rendered.values():
        RuntimeEnv(**yaml.safe_load(one(objects, "RayJob")["spec"]["runtimeEnvYAML"]))
    RuntimeEnv(**yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text(encoding="utf-8")))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_as_non_root_and_every_container_has_requests_and_limits(rendered, overlay):
    pods = [(obj["kind"], path, spec) for obj in rendered[overlay] for path, spec in pod_specs(obj)]
    assert len(pods) >= 6  # mlflow, job submitter, job head + workers, service head + workers
    for kind, path, spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] is True, (kind, path)
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, (kind, path)
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], (kind, path)
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (kind, path, bound)
    for kind in ("RayJob", "RayService"):
        obj = one(rendered[overlay], kind)
        autoscaler = (obj["spec"].get("rayClusterSpec") or obj["spec"]["rayClusterConfig"])["autoscalerOptions"]
        assert autoscaler["securityContext"]["runAsNonRoot"] is True
        assert {"requests", "limits"} <= set(autoscaler["resources"])


def test_overlays_name_the_image_of_their_accelerator(rendered):
    for overlay, objects in rendered.items():
        images = {c["image"] for obj in objects for _, spec in pod_specs(obj) for c in spec["containers"]}
        assert images == {f"registry.example.com/crlft:0.1.0-{overlay}"}


def test_gpu_overlay_adds_gpu_groups_that_ask_for_gpus_tolerate_their_taint_and_scale_within_bounds(rendered):
    for kind in ("RayJob", "RayService"):
        groups = {g["groupName"]: g for g in worker_groups(one(rendered["gpu"], kind))}
        assert set(groups) == {"cpu", "gpu"}
        spec = groups["gpu"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert groups["gpu"]["maxReplicas"] >= 1
    serve = yaml.safe_load(one(rendered["gpu"], "RayService")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] == 1
    assert serve["applications"][0]["args"]["overrides"]["inference.engine"] == "vllm"  # the image's CUDA vLLM
    assert "--gpu" in one(rendered["gpu"], "RayJob")["spec"]["entrypoint"].split()
    for kind in ("RayJob", "RayService"):
        assert [g["groupName"] for g in worker_groups(one(rendered["cpu"], kind))] == ["cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_clusters_autoscale_within_bounds_keep_token_auth_and_the_job_cleans_up(rendered, overlay):
    job = one(rendered[overlay], "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    auth_secrets = {s["metadata"]["name"]: s["stringData"] for s in load_documents(SECRETS_TEMPLATE)}
    for kind in ("RayJob", "RayService"):
        obj = one(rendered[overlay], kind)
        cluster = obj["spec"].get("rayClusterSpec") or obj["spec"]["rayClusterConfig"]
        assert cluster["enableInTreeAutoscaling"] is True
        assert cluster["authOptions"]["mode"] == "token"
        assert "auth_token" in auth_secrets[cluster["authOptions"]["secretName"]]
        for group in worker_groups(obj):
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (kind, group["groupName"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_key_and_volume_claim_a_pod_needs_is_defined(rendered, overlay):
    secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in load_documents(SECRETS_TEMPLATE)}
    claims = {o["metadata"]["name"] for o in rendered[overlay] if o["kind"] == "PersistentVolumeClaim"}
    for obj in rendered[overlay]:
        for _, spec in pod_specs(obj):
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
            for container in spec["containers"]:
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref and not ref.get("optional"):
                        assert ref["key"] in secrets[ref["name"]], (obj["kind"], env["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_node_of_the_endpoint_runs_the_haproxy_ingress_as_crlft_serve_does(rendered, overlay):
    from cluster.session import ingress_env
    from crlft.config import Config

    names = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_OBSERVE_ERROR_LIMIT", "RAY_SERVE_HAPROXY_RETRY_ON")
    wanted = {name: ingress_env(Config())[name] for name in names}
    for _, spec in pod_specs(one(rendered[overlay], "RayService")):
        for container in spec["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in wanted} == wanted, container["name"]


# ---------------------------------------------------------------------------------------------------------------------
# Planted mistakes: each check must catch its kind of error


@pytest.fixture()
def job(rendered) -> dict[str, Any]:
    return one(rendered["cpu"], "RayJob")


@pytest.fixture()
def service(rendered) -> dict[str, Any]:
    return one(rendered["cpu"], "RayService")


@pytest.fixture()
def deployment(rendered) -> dict[str, Any]:
    return one(rendered["cpu"], "Deployment")


def test_an_unknown_field_in_a_rayjob_is_an_error(job):
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in error for error in ray_object_errors(job))


def test_an_unknown_field_deep_in_a_ray_pod_template_is_an_error(service):
    worker_groups(service)[0]["template"]["spec"]["containers"][0]["resource"] = {}
    errors = ray_object_errors(service)
    assert any("/spec/rayClusterConfig/workerGroupSpecs/0/template/spec/containers/0" in e for e in errors)


def test_a_wrong_type_in_a_rayservice_is_an_error(service):
    worker_groups(service)[0]["maxReplicas"] = "four"
    assert any("maxReplicas" in error and "'four'" in error for error in ray_object_errors(service))


def test_two_worker_groups_of_one_name_are_an_error(job):
    groups = worker_groups(job)
    groups.append(copy.deepcopy(groups[0]))
    assert "duplicate worker group name 'cpu'" in ray_object_errors(job)


def test_a_duplicate_in_a_list_the_crd_keys_by_name_is_an_error(job):
    container = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["env"].append(dict(container["env"][0]))
    assert any("containers/0/env: duplicate key ('MLFLOW_TRACKING_URI',)" in e for e in ray_object_errors(job))


def test_a_worker_group_whose_minimum_exceeds_its_maximum_is_an_error(service):
    worker_groups(service)[0]["minReplicas"] = 9
    assert any("minReplicas 9 > maxReplicas" in error for error in ray_object_errors(service))


def test_an_unknown_field_in_a_deployment_is_an_error(deployment):
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in error for error in builtin_errors(deployment))


def test_a_wrong_type_in_a_deployment_is_an_error(deployment):
    deployment["spec"]["replicas"] = "one"
    assert any("/spec/replicas" in error for error in builtin_errors(deployment))


def _serve_config(service: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        (lambda app: app.update(import_path="services.chatt:build_app"), "services/chatt.py does not exist"),
        (lambda app: app.update(import_path="services.chat:build"), "defines no top-level 'build'"),
        (lambda app: app["args"].update(modell="x"), "args ['modell'] are not among"),
        (lambda app: app["deployments"][0].update(max_ongoing_request=4), "unknown field(s) ['max_ongoing_request']"),
        (lambda app: app["deployments"][0].update(name="Chat"), "deployment 'Chat' is not"),
        (lambda app: app["deployments"][0]["autoscaling_config"].update(min_replicas="x"), "min_replicas"),
        (lambda app: app["deployments"][0]["ray_actor_options"].update(num_cpu=1), "['num_cpu']"),
        (lambda app: app.update(route_prefix=5), "route_prefix"),
        (lambda app: app["args"]["overrides"].update({"serve.engine": "vllm"}), "serve.engine moved to inference."),
        (lambda app: app["args"]["overrides"].update({"serve.max_replica": 2}), "serve.max_replica"),
    ],
    ids=[
        "missing-module",
        "missing-builder",
        "unknown-builder-arg",
        "unknown-deployment-field",
        "unknown-deployment",
        "autoscaling-wrong-type",
        "unknown-actor-option",
        "wrong-type",
        "moved-config-key",
        "unknown-config-key",
    ],
)
def test_a_mistake_in_the_serve_config_is_an_error(service, mistake, expected):
    config = _serve_config(service)
    mistake(config["applications"][0])
    errors = serve_config_errors(yaml.safe_dump(config), REPO)
    assert any(expected in error for error in errors), errors


@pytest.mark.parametrize(
    ("entrypoint", "expected"),
    [
        ("python -m jobs.pipelines --state-dir /data", "jobs/pipelines.py does not exist"),
        ("python -m jobs.pipeline --state-dirr /data", "has no option --state-dirr"),
        ("python -m crlft.errors", "has no `if __name__"),
        ("bash -c 'python -m jobs.pipeline'", "expected `python -m MODULE"),
    ],
)
def test_a_wrong_entrypoint_is_an_error(entrypoint, expected):
    assert any(expected in error for error in entrypoint_errors(entrypoint, REPO))


def _kustomization(tmp_path: Path, body: dict[str, Any], patch: list[dict[str, Any]] | None = None) -> Path:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    if patch is not None:
        (tmp_path / "patch.yaml").write_text(yaml.safe_dump(patch), encoding="utf-8")
    return tmp_path


def test_a_patch_on_a_path_that_does_not_exist_does_not_render(tmp_path):
    base = str(K8S / "base")
    target = {"kind": "RayJob", "name": "crlft-pipeline"}
    body = {"resources": [base], "patches": [{"path": "patch.yaml", "target": target}]}
    directory = _kustomization(tmp_path, body, [{"op": "replace", "path": "/spec/entrypointt", "value": "x"}])
    with pytest.raises(RenderError, match="nothing there"):
        render(directory)


def test_kustomize_features_the_renderer_lacks_are_refused_not_ignored(tmp_path):
    directory = _kustomization(tmp_path, {"resources": [str(K8S / "base")], "namePrefix": "dev-"})
    with pytest.raises(RenderError, match="namePrefix"):
        render(directory)

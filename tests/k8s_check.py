"""Offline checks of the Kubernetes manifests in k8s/: no cluster, no kustomize binary, no Ray import for code paths.

- `render(dir)`: a kustomization rendered in Python, for exactly the kustomize features the manifests use
  (resources, namespace, labels, images, JSON 6902 patches with a target), applied in kustomize's own order
  (patches, namespace, labels, images); any other kustomization field or patch form is refused, not guessed at.
- `ray_object_errors(obj)`: a RayCluster / RayJob / RayService against KubeRay's CRD schema (tests/fixtures/
  kuberay-crds), made strict the way an API server with field validation is: unknown fields are errors. Also the
  list-map / set uniqueness the CRD declares and the operator's worker-group rules. Not evaluated: the CRD's CEL
  rules (x-kubernetes-validations).
- `builtin_errors(obj)`: a built-in kind with kubernetes-validate's bundled, strict schemas.
- `serve_config_errors(text, repo)`: serveConfigV2 against Ray's ServeDeploySchema, with unknown keys refused too
  (Ray's schema tolerates them), the import path and builder args checked in the source (AST, no import), the
  builder's config `overrides` against crlft's config (a key it lacks, or one that moved, is an error).
- `entrypoint_errors(cmd, repo)`: `python -m MODULE FLAGS` names a module of the repository that is runnable and
  defines every flag used (AST of its add_arguments).
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CRD_DIR = REPO / "tests" / "fixtures" / "kuberay-crds"
K8S_VERSION = "1.33"
RAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
SELECTOR_FIELDS = {"group", "version", "kind", "name", "namespace"}

Obj = dict[str, Any]


class RenderError(Exception):
    """The kustomization uses something this renderer does not implement, or a patch does not apply."""


# ---------------------------------------------------------------------------------------------------------------------
# kustomize, the subset the manifests use


def load_documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def render(directory: Path) -> list[Obj]:
    """The objects `kustomize build DIRECTORY` would print, for the features listed in KUSTOMIZATION_FIELDS."""
    file = directory / "kustomization.yaml"
    kustomization = yaml.safe_load(file.read_text(encoding="utf-8"))
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise RenderError(f"{file}: {sorted(unknown)} not implemented by this renderer")
    objects: list[Obj] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        objects += render(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        apply_patch(objects, patch, directory)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for label in kustomization.get("labels", []):
        if set(label) - {"pairs"}:
            raise RenderError(f"{file}: labels options {sorted(set(label) - {'pairs'})} not implemented")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for obj in objects:
            set_image(obj, image)
    return objects


def apply_patch(objects: list[Obj], patch: Obj, directory: Path) -> None:
    if set(patch) - {"path", "patch", "target"}:
        raise RenderError(f"patch options {sorted(set(patch) - {'path', 'patch', 'target'})} not implemented")
    text = (directory / patch["path"]).read_text(encoding="utf-8") if "path" in patch else patch["patch"]
    operations = yaml.safe_load(text)
    if not isinstance(operations, list) or "target" not in patch:
        raise RenderError(f"{patch.get('path', 'inline patch')}: only JSON 6902 patches with a target are implemented")
    selector = patch["target"]
    if set(selector) - SELECTOR_FIELDS:
        raise RenderError(f"target selector {sorted(set(selector) - SELECTOR_FIELDS)} not implemented")
    matched = [obj for obj in objects if selects(selector, obj)]
    if not matched:
        raise RenderError(f"patch {patch.get('path', '')}: no resource matches target {selector}")
    for obj in matched:
        for operation in operations:
            json_patch(obj, operation)


def selects(selector: Obj, obj: Obj) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    fields = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "namespace": obj["metadata"].get("namespace", ""),
    }
    return all(re.fullmatch(str(pattern), fields[key]) for key, pattern in selector.items())


def json_pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise RenderError(f"JSON patch path {path}: {part!r} does not exist") from None
    return node


def json_patch(doc: Obj, operation: Obj) -> None:
    """One RFC 6902 operation (add, remove, replace, test) applied in place."""
    op, path = operation.get("op"), operation.get("path", "")
    if op not in {"add", "remove", "replace", "test"}:
        raise RenderError(f"JSON patch op {op!r} not implemented")
    parts = json_pointer(path)
    parent, last = _parent(doc, parts, path), parts[-1]
    key: int | str
    if isinstance(parent, list):
        if last == "-" and op == "add":
            parent.append(copy.deepcopy(operation["value"]))
            return
        if not last.isdigit() or int(last) > len(parent) - (op != "add"):
            raise RenderError(f"JSON patch {op} {path}: no list index {last!r} there")
        key = int(last)
    elif isinstance(parent, dict):
        key = last
        if op != "add" and key not in parent:
            raise RenderError(f"JSON patch {op} {path}: nothing there")
    else:
        raise RenderError(f"JSON patch path {path}: parent is neither an object nor a list")
    if op == "add" and isinstance(parent, list):
        parent.insert(int(key), copy.deepcopy(operation["value"]))
    elif op in {"add", "replace"}:
        parent[key] = copy.deepcopy(operation["value"])
    elif op == "remove":
        del parent[key]
    elif parent[key] != operation["value"]:
        raise RenderError(f"JSON patch test {path}: {parent[key]!r} != {operation['value']!r}")


def containers(node: Any) -> Iterator[Obj]:
    """Every container (and init container) anywhere in an object: where kustomize's images transformer looks."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"containers", "initContainers"} and isinstance(value, list):
                yield from (item for item in value if isinstance(item, dict))
            yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def split_image(reference: str) -> tuple[str, str]:
    """(name, tag) of an image reference; the tag is what follows the last ':' after the last '/'."""
    name = reference.split("@", 1)[0]
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        return name[:colon], name[colon + 1 :]
    return name, ""


def set_image(obj: Obj, image: Obj) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise RenderError(f"images options {sorted(set(image) - {'name', 'newName', 'newTag'})} not implemented")
    for container in containers(obj):
        name, tag = split_image(container.get("image", ""))
        if name == image["name"]:
            new_tag = image.get("newTag", tag)
            container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")


# ---------------------------------------------------------------------------------------------------------------------
# Schemas


def strict(schema: Any) -> Any:
    """The schema with unknown properties refused wherever it lists properties and does not say otherwise."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@functools.cache
def crd_schema(kind: str) -> Obj:
    path = CRD_DIR / f"ray.io_{RAY_KINDS[kind]}.yaml"
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"])


def _where(path: Any) -> str:
    return "/" + "/".join(str(part) for part in path)


def uniqueness_errors(schema: Obj, instance: Any, path: tuple[Any, ...] = ()) -> list[str]:
    """x-kubernetes-list-type map (unique keys) and set (unique items), which JSON Schema does not check."""
    errors: list[str] = []
    if isinstance(instance, list):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = [tuple(item.get(k) for k in schema.get("x-kubernetes-list-map-keys", [])) for item in instance]
            errors += [f"{_where(path)}: duplicate key {key}" for key in {k for k in keys if keys.count(k) > 1}]
        elif list_type == "set" and len({repr(item) for item in instance}) != len(instance):
            errors.append(f"{_where(path)}: duplicate items in a set")
        for index, item in enumerate(instance):
            errors += uniqueness_errors(schema.get("items", {}), item, (*path, index))
    elif isinstance(instance, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else {})
            errors += uniqueness_errors(sub, value, (*path, key))
    return errors


DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def ray_object_errors(obj: Obj) -> list[str]:
    """KubeRay object against its CRD (strict) and the uniqueness the CRD declares; [] when valid."""
    import jsonschema

    schema = crd_schema(obj["kind"])
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{_where(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
    errors += uniqueness_errors(schema, obj)
    errors += worker_group_errors(obj)
    name = obj.get("metadata", {}).get("name", "")
    if not DNS_LABEL.fullmatch(name) or len(name) > 63:
        errors.append(f"/metadata/name: {name!r} is not a DNS label of at most 63 characters")
    return errors


def worker_group_errors(obj: Obj) -> list[str]:
    """Rules the KubeRay operator enforces beyond the CRD: unique worker group names, minReplicas <= maxReplicas."""
    spec = obj.get("spec") or {}
    cluster = spec if obj["kind"] == "RayCluster" else spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or {}
    groups = [g for g in cluster.get("workerGroupSpecs") or [] if isinstance(g, dict)]
    names = [g.get("groupName") for g in groups]
    errors = [f"duplicate worker group name {name!r}" for name in sorted({n for n in names if names.count(n) > 1})]
    for group in groups:
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            errors.append(f"worker group {group.get('groupName')!r}: minReplicas {low} > maxReplicas {high}")
    return errors


def builtin_errors(obj: Obj) -> list[str]:
    """A built-in kind against kubernetes-validate's strict schema for K8S_VERSION; [] when valid."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{_where(error.absolute_path)}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [error.message]
    return []


# ---------------------------------------------------------------------------------------------------------------------
# Code the manifests point at


def module_file(module: str, repo: Path) -> Path:
    return repo.joinpath(*module.split(".")).with_suffix(".py")


def top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def literal_constant(tree: ast.Module, name: str) -> Any:
    """The value of a top-level `NAME = <literal>`, or None."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return None
    return None


def parse_module(module: str, repo: Path) -> ast.Module | None:
    path = module_file(module, repo)
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) if path.is_file() else None


def import_path_errors(import_path: str, repo: Path) -> list[str]:
    module, sep, attribute = import_path.partition(":")
    if not sep:
        module, _, attribute = import_path.rpartition(".")
    tree = parse_module(module, repo)
    if tree is None:
        return [f"import path {import_path}: {module_file(module, repo).relative_to(repo)} does not exist"]
    if attribute not in top_level_names(tree):
        return [f"import path {import_path}: {module} defines no top-level {attribute!r}"]
    return []


def defined_flags(tree: ast.Module) -> set[str]:
    """Option strings of every `*.add_argument("--x", ...)` and `config_flag(parser, "key", "--x")` in the module, plus
    those of add_config_arguments."""
    flags: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute | ast.Name):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        if name in ("add_argument", "config_flag"):
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
        elif name == "add_config_arguments":
            flags |= {"--config", "--set"}
    return flags


def is_runnable(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def entrypoint_errors(entrypoint: str, repo: Path) -> list[str]:
    """`python -m MODULE ARGS`: MODULE is in the repository, runnable, and defines every --flag in ARGS."""
    words = shlex.split(entrypoint)
    if len(words) < 3 or words[0] not in {"python", "python3"} or words[1] != "-m":
        return [f"entrypoint {entrypoint!r}: expected `python -m MODULE ...`"]
    module = words[2]
    tree = parse_module(module, repo)
    if tree is None:
        return [f"entrypoint {entrypoint!r}: {module_file(module, repo).relative_to(repo)} does not exist"]
    errors = [] if is_runnable(tree) else [f"entrypoint {entrypoint!r}: {module} has no `if __name__ == '__main__'`"]
    known = defined_flags(tree)
    for word in words[3:]:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            errors.append(f"entrypoint {entrypoint!r}: {module} has no option {flag}")
    return errors


def _unknown_keys(where: str, given: Obj, model: Any) -> list[str]:
    unknown = sorted(set(given) - set(model.model_fields))
    return [f"{where}: unknown field(s) {unknown}"] if unknown else []


def serve_config_errors(text: str, repo: Path) -> list[str]:
    """serveConfigV2 (a YAML string) against Ray's schemas, strictly, and against the code it names."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    config = yaml.safe_load(text)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as error:
        return [f"serveConfigV2: {e['loc']}: {e['msg']}" for e in error.errors()]
    errors = _unknown_keys("serveConfigV2", config, ServeDeploySchema)
    errors += _unknown_keys("serveConfigV2 http_options", config.get("http_options") or {}, HTTPOptionsSchema)
    for app in config.get("applications", []):
        where = f"serveConfigV2 application {app.get('name')}"
        errors += _unknown_keys(where, app, ServeApplicationSchema)
        errors += import_path_errors(app["import_path"], repo)
        errors += builder_errors(app, repo, where)
        for deployment in app.get("deployments", []):
            at = f"{where} deployment {deployment.get('name')}"
            errors += _unknown_keys(at, deployment, DeploymentSchema)
            errors += _unknown_keys(
                f"{at} ray_actor_options", deployment.get("ray_actor_options") or {}, RayActorOptionsSchema
            )
            autoscaling = deployment.get("autoscaling_config")
            if autoscaling is not None:
                errors += _unknown_keys(f"{at} autoscaling_config", autoscaling, AutoscalingConfig)
                try:
                    AutoscalingConfig.model_validate(autoscaling)
                except ValidationError as error:
                    errors += [f"{at} autoscaling_config: {e['loc']}: {e['msg']}" for e in error.errors()]
    return errors


def builder_errors(app: Obj, repo: Path, where: str) -> list[str]:
    """The application's args and deployment names against the builder module's BUILD_ARGS / DEPLOYMENT_NAME."""
    module = app["import_path"].partition(":")[0]
    tree = parse_module(module, repo)
    if tree is None:
        return []
    errors: list[str] = []
    build_args = literal_constant(tree, "BUILD_ARGS")
    if build_args is not None:
        unknown = sorted(set(app.get("args") or {}) - set(build_args))
        errors += [f"{where}: args {unknown} are not among {module}.BUILD_ARGS {list(build_args)}"] if unknown else []
    errors += [f"{where}: overrides: {e}" for e in config_override_errors((app.get("args") or {}).get("overrides"))]
    deployment_name = literal_constant(tree, "DEPLOYMENT_NAME")
    if deployment_name is not None:
        for deployment in app.get("deployments", []):
            if deployment.get("name") != deployment_name:
                errors.append(f"{where}: deployment {deployment.get('name')!r} is not {module}'s {deployment_name!r}")
    return errors


def config_override_errors(overrides: Obj | None) -> list[str]:
    """`section.key: value` overrides as crlft's config applies them (crlft.config.load_config, pydantic only)."""
    from crlft.config import load_config
    from crlft.errors import CrlftError

    try:
        load_config(None, overrides or {})
    except CrlftError as error:
        return [str(error)]
    return []


# ---------------------------------------------------------------------------------------------------------------------
# Pods


def pod_specs(node: Any, path: str = "") -> Iterator[tuple[str, Obj]]:
    """(path, pod spec) for every pod spec in an object: any mapping that holds a `containers` list."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield path, node
        for key, value in node.items():
            yield from pod_specs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from pod_specs(item, f"{path}/{index}")

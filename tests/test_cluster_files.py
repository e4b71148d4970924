"""The cluster files, checked offline with Ray's own code: no Ray started, no cloud or Kubernetes contacted.

- cluster.yaml, cluster/local.yaml go through what `ray up` does before it talks to a provider: `prepare_config`
  (the provider's defaults merged in; for `local`, the IP lists turned into a node type) and `validate_config`
  (ray/autoscaler/ray-schema.json through jsonschema, then Ray's cross-field checks).
- cluster/kuberay.yaml: the Ray wheel ships no RayCluster CRD schema, so the manifest goes through the function the
  KubeRay autoscaler reads a RayCluster with (`_derive_autoscaling_config_from_ray_cr`, which ends in the same
  `validate_config`), and the fields that function ignores (apiVersion, kind, rayVersion, images, authOptions) are
  checked here by name.
- Versions: wherever a cluster file names Ray, torch or torchvision, it must be pyproject.toml's pin, and the pip
  line that installs the nodes must be exactly pyproject's dependency list, so the files cannot drift apart.

- The job upload (`ray job submit --working-dir .`): Ray's own packager over the repository, .rayignore applied.

The Ray helpers are private API. Ray is pinned exactly, and an upgrade that moves them fails here first.
Every check is a function returning its problems; the last tests break the files on purpose to show each one bites.
"""
from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import click
import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
AWS, LOCAL, KUBERAY = "cluster.yaml", "cluster/local.yaml", "cluster/kuberay.yaml"
LAUNCHER_FILES = [AWS, LOCAL]
ALL_FILES = [AWS, LOCAL, KUBERAY]
SWEEP = ROOT / "sweeps" / "cifar10-vgg19.yaml"  # the sweep the GPU node types are sized for


def load(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


def text(rel: str) -> str:
    return (ROOT / rel).read_text()


def _key(req: Requirement) -> tuple:
    return canonicalize_name(req.name), tuple(sorted(req.extras)), str(req.specifier)


def pyproject_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(Requirement(d).name): Requirement(d) for d in deps}


def pinned(name: str) -> str:
    """The exact version pyproject.toml pins `name` to (it must be an == pin)."""
    (spec,) = pyproject_requirements()[name].specifier
    assert spec.operator == "==", f"pyproject.toml must pin {name} exactly, not {spec}"
    return spec.version


def ray_up_checks(cfg: dict) -> dict:
    """What `ray up` does to a config before contacting a provider; raises on a bad config."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def kuberay_autoscaling_config(cr: dict) -> dict:
    """The RayCluster as the KubeRay autoscaler reads it; raises on a manifest it cannot read."""
    cr = copy.deepcopy(cr)
    cr["metadata"].setdefault("namespace", "default")  # the API server fills it in from `kubectl apply -n`
    return _derive_autoscaling_config_from_ray_cr(cr)


# ---- checks, each returning a list of problems -------------------------------------------------------------------

_RAY_VERSION = [re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)"),              # Docker tags
                re.compile(r"\bray(?:\[[\w,\s-]*\])?==(\d+\.\d+\.\d+)"),     # pip pins
                re.compile(r"\brayVersion:\s*[\"']?(\d+\.\d+\.\d+)")]        # KubeRay
_PIN = {name: re.compile(rf"\b{name}==([\w.+]+)") for name in ("torch", "torchvision")}


def version_problems(file_text: str) -> list[str]:
    ray = pinned("ray")
    found = [v for pattern in _RAY_VERSION for v in pattern.findall(file_text)]
    problems = [] if found else ["names no Ray version at all (Docker tag, pip pin or rayVersion)"]
    problems += [f"Ray {v}, but pyproject.toml pins {ray}" for v in found if v != ray]
    for name, pattern in _PIN.items():
        problems += [f"{name} {v}, but pyproject.toml pins {pinned(name)}"
                     for v in pattern.findall(file_text) if v != pinned(name)]
    return problems


def pip_problems(cfg: dict, ray_from_image: bool) -> list[str]:
    """The nodes' pip line must install exactly pyproject's dependencies (Ray aside where the image brings it)."""
    lines = [c for c in cfg.get("setup_commands", []) if c.lstrip().startswith("pip install")]
    if len(lines) != 1:
        return [f"expected one `pip install` in setup_commands, found {len(lines)}"]
    args = shlex.split(lines[0])[2:]
    installed = {_key(Requirement(a)) for a in args if not a.startswith("-")}
    expected = {_key(r) for name, r in pyproject_requirements().items() if not (ray_from_image and name == "ray")}
    return ([f"pyproject.toml requires {k[0]}{k[2]}, the cluster does not install it" for k in expected - installed]
            + [f"the cluster installs {k[0]}{k[2]}, pyproject.toml does not say so" for k in installed - expected])


def token_auth_problems(cfg: dict) -> list[str]:
    """Ray 2.60 reads RAY_AUTH_MODE from the environment only: every `ray start` must run with it, and every node
    must have the client's token at the default path (~/.ray/auth_token)."""
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in cfg.get(key, []) if "ray start" in c]
    problems = [] if len(starts) >= 2 else ["head and worker start commands must both run `ray start`"]
    problems += [f"`ray start` without RAY_AUTH_MODE=token: {c!r}" for c in starts
                 if not re.search(r"RAY_AUTH_MODE=token\s+ray start", c)]
    mounts = cfg.get("file_mounts") or {}
    if not any(remote.endswith("/.ray/auth_token") and local == "~/.ray/auth_token" for remote, local in mounts.items()):
        problems.append("file_mounts must copy ~/.ray/auth_token to ~/.ray/auth_token on every node")
    return problems


def packing_problems(node_types: dict[str, dict], per_trial: dict) -> list[str]:
    """Every GPU node must have the CPUs for as many trials as its GPUs hold, or part of each GPU idles."""
    problems = []
    for name, nt in node_types.items():
        res = nt["resources"]
        if res.get("GPU"):
            trials = int(res["GPU"] / per_trial["gpu"])
            if res.get("CPU", 0) < trials * per_trial["cpu"]:
                problems.append(f"{name}: {res['GPU']} GPU hold {trials} trials needing {trials * per_trial['cpu']}"
                                f" CPUs, but it has {res.get('CPU', 0)}")
    return problems


def kuberay_problems(cr: dict) -> list[str]:
    ray = pinned("ray")
    problems = []
    if (cr.get("apiVersion"), cr.get("kind")) != ("ray.io/v1", "RayCluster"):
        problems.append(f"not a ray.io/v1 RayCluster: {cr.get('apiVersion')} {cr.get('kind')}")
    spec = cr.get("spec", {})
    if str(spec.get("rayVersion")) != ray:
        problems.append(f"rayVersion {spec.get('rayVersion')!r}, but pyproject.toml pins {ray}")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("spec.authOptions.mode must be token")
    groups = [spec.get("headGroupSpec", {})] + spec.get("workerGroupSpecs", [])
    for group in groups:
        for c in group.get("template", {}).get("spec", {}).get("containers", []):
            tag = c.get("image", "").rpartition(":")[2]
            if not tag.startswith(ray + "-"):
                problems.append(f"{c.get('name')}: image {c.get('image')!r} is not tagged with Ray {ray}")
    return problems


def layout_problems(node_types: dict[str, dict], head: str) -> list[str]:
    """The shape docs/cluster.md relies on: a driver-only head, GPU workers with one always up, CPU workers."""
    res = {name: nt["resources"] for name, nt in node_types.items()}
    workers = {name: nt for name, nt in node_types.items() if name != head}
    gpu = [name for name in workers if res[name].get("GPU")]
    problems = [] if res[head].get("CPU") == 0 and not res[head].get("GPU") else [f"head {head} must offer no CPU/GPU"]
    if not gpu:
        problems.append("no GPU worker type")
    elif not any(workers[name].get("min_workers", 0) >= 1 for name in gpu):
        problems.append("no GPU worker is kept up: `gradauth sweep` would find no GPU at start and run on CPU")
    if not any(not res[name].get("GPU") and res[name].get("CPU") for name in workers):
        problems.append("no CPU-only worker type for slicing")
    return problems


# ---- the shipped files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_files_pass_ray_up_validation(rel):
    prepared = ray_up_checks(load(rel))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["max_workers"] >= sum(nt.get("min_workers", 0) for nt in prepared["available_node_types"].values())


def test_aws_cluster_layout():
    cfg = ray_up_checks(load(AWS))
    types = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["cache_stopped_nodes"] is False
    assert layout_problems(types, cfg["head_node_type"]) == []
    assert "InstanceMarketOptions" not in types[cfg["head_node_type"]]["node_config"]  # the head is on-demand
    for name, nt in types.items():
        if name != cfg["head_node_type"]:
            assert nt["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}, name
            assert nt["node_config"]["IamInstanceProfile"], f"{name} cannot write checkpoints to s3:// storage"
    assert [types[n]["resources"] for n in ("ray.worker.gpu", "ray.worker.gpu4", "ray.worker.cpu")] == [
        {"CPU": 8, "GPU": 1}, {"CPU": 48, "GPU": 4}, {"CPU": 16}]
    assert 0 < cfg["idle_timeout_minutes"] <= 30


def test_kuberay_manifest_reads_as_ray_does():
    cr = load(KUBERAY)
    assert kuberay_problems(cr) == []
    auto = kuberay_autoscaling_config(cr)
    types = auto["available_node_types"]
    assert layout_problems(types, auto["head_node_type"]) == []
    assert {n: {k: v for k, v in t["resources"].items() if k != "memory"} for n, t in types.items()} == {
        "headgroup": {"CPU": 0}, "gpu": {"CPU": 8, "GPU": 1}, "cpu": {"CPU": 16}}
    assert (types["gpu"]["min_workers"], types["gpu"]["max_workers"]) == (1, 8)
    assert auto["idle_timeout_minutes"] == 10


@pytest.mark.skipif(not SWEEP.is_file(), reason="sweeps/cifar10-vgg19.yaml not present")
def test_gpu_nodes_fit_whole_vgg19_trials():
    per_trial = yaml.safe_load(SWEEP.read_text())["sweep"]["resources"]
    assert packing_problems(ray_up_checks(load(AWS))["available_node_types"], per_trial) == []
    assert packing_problems(kuberay_autoscaling_config(load(KUBERAY))["available_node_types"], per_trial) == []


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_token_auth_is_on_everywhere(rel):
    assert token_auth_problems(load(rel)) == []


@pytest.mark.parametrize("rel", ALL_FILES)
def test_versions_match_pyproject(rel):
    assert version_problems(text(rel)) == []


@pytest.mark.parametrize("rel, ray_from_image", [(AWS, True), (LOCAL, False)])
def test_nodes_install_exactly_pyprojects_dependencies(rel, ray_from_image):
    assert pip_problems(load(rel), ray_from_image) == []


# ---- broken files must fail --------------------------------------------------------------------------------------

def test_ray_up_validation_rejects_broken_configs():
    good = load(AWS)
    no_resources = copy.deepcopy(good)
    del no_resources["available_node_types"]["ray.worker.gpu"]["resources"]
    typo = copy.deepcopy(good) | {"idle_timeout_minute": 10}
    bad_head = copy.deepcopy(good) | {"head_node_type": "ray.head.gpu"}
    for bad, error in [(no_resources, jsonschema.ValidationError), (typo, jsonschema.ValidationError),
                       (bad_head, ValueError)]:
        with pytest.raises(error):
            ray_up_checks(bad)
    no_workers = copy.deepcopy(load(LOCAL))
    del no_workers["provider"]["worker_ips"]
    with pytest.raises(click.ClickException):
        ray_up_checks(no_workers)


def test_kuberay_checks_reject_broken_manifests():
    good = load(KUBERAY)
    no_cpu = copy.deepcopy(good)
    del no_cpu["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"]
    del no_cpu["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    with pytest.raises(ValueError, match="CPU"):
        kuberay_autoscaling_config(no_cpu)
    drifted = copy.deepcopy(good)
    drifted["spec"]["rayVersion"] = "2.59.0"
    drifted["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.59.0-gpu"
    del drifted["spec"]["authOptions"]
    assert len(kuberay_problems(drifted)) == 3
    no_gpu_limit = copy.deepcopy(good)
    del no_gpu_limit["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"]
    del no_gpu_limit["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"][
        "nvidia.com/gpu"]
    types = kuberay_autoscaling_config(no_gpu_limit)["available_node_types"]
    assert layout_problems(types, "headgroup") == ["no GPU worker type"]


def test_drift_and_auth_checks_reject_broken_files():
    assert version_problems(text(AWS).replace("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.59.0-py311-gpu")) \
        == ["Ray 2.59.0, but pyproject.toml pins 2.60.0"]
    assert version_problems(text(LOCAL).replace('"torch==2.14.1"', '"torch==2.13.0"')) \
        == ["torch 2.13.0, but pyproject.toml pins 2.14.1"]
    assert version_problems("image: python:3.11") == ["names no Ray version at all (Docker tag, pip pin or rayVersion)"]

    missing_dep = copy.deepcopy(load(AWS))
    missing_dep["setup_commands"] = [missing_dep["setup_commands"][0].replace(' "safetensors>=0.4"', "")]
    assert pip_problems(missing_dep, ray_from_image=True) == [
        "pyproject.toml requires safetensors>=0.4, the cluster does not install it"]

    no_auth = copy.deepcopy(load(AWS))
    no_auth["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "")
                                            for c in no_auth["worker_start_ray_commands"]]
    no_auth["file_mounts"] = {}
    assert len(token_auth_problems(no_auth)) == 2

    cramped = {"g5.xlarge": {"resources": {"CPU": 4, "GPU": 1}}}
    assert packing_problems(cramped, {"cpu": 2, "gpu": 0.25}) == [
        "g5.xlarge: 1 GPU hold 4 trials needing 8 CPUs, but it has 4"]


def test_job_upload_is_the_code_without_results(tmp_path):
    """`ray job submit --working-dir .` zips the repository as Ray's packager does (.gitignore and .rayignore
    applied): the committed reference results and .git stay out (Ray does not skip .git itself, and it grows with the
    history), the code and the sweeps go in, far below Ray's size cap."""
    import zipfile

    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
    create_package(str(ROOT), tmp_path / "job.zip", include_gitignore=True)
    names = zipfile.ZipFile(tmp_path / "job.zip").namelist()
    assert not [n for n in names if n.startswith(("results/", ".git/"))]
    assert {"gradauth/__main__.py", "sweeps/quickstart.yaml", "sweeps/cifar10-vgg19.yaml"} <= set(names)
    assert (tmp_path / "job.zip").stat().st_size < min(2 * 2**20, GCS_STORAGE_MAX_SIZE // 10)

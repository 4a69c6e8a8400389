"""A plan's configuration as files to deploy it: `splitserve up` arguments, a compose override for
docker-compose.yml, and a Kustomize overlay of deploy/k8s/base.

Every worker gets the plan's token budget and batch limit, and on a CPU its share of cores as
torch threads (and, in compose and Kubernetes, as its CPU limit and request). Neither
docker-compose.yml nor deploy/k8s has a colocated worker, so for a colocated plan one is derived
from the prefill worker's definition (the worker image has a `colocated` target) and the prefill
and decode workers are scaled to 0. More than one device per worker needs tensor parallelism,
which splitserve's engine does not have: such a plan cannot be written.
"""

from __future__ import annotations

import copy
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from splitserve.common.engine_args import format_cpus
from splitserve.planner.latency import Profile
from splitserve.planner.placements import Placement, is_cpu
from splitserve.planner.plan import Evaluation
from splitserve.planner.sim_engine import EngineSettings
from splitserve.planner.simulator import DEFAULT_CHUNK_SIZE, DEFAULT_PREFILL_SLICE_MS, Mode

REPO_BASE = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base"  # in a source checkout
COLOCATED_PORT = 50080  # deploy/images/Containerfile.worker's colocated target


@dataclass(frozen=True)
class Deployable:
    """The chosen configuration, as the writers need it."""

    placement: Placement
    token_budget: int
    max_num_seqs: int
    engine: EngineSettings  # the plan's KV cache
    cpu: bool  # cores per worker (else devices per worker)
    headline: str  # one line on what was planned, for the files' comments

    @classmethod
    def of(cls, best: Evaluation, profile: Profile, engine: EngineSettings, headline: str) -> Deployable:
        c = best.candidate
        if not is_cpu(profile) and max(c.placement.degrees) > 1:
            raise ValueError(f"{c.placement.describe()} gives a worker more than one device: splitserve's engine "
                             "runs one device per worker (no tensor parallelism); plan with --degrees 1")
        return cls(c.placement, c.token_budget, c.max_num_seqs, engine, is_cpu(profile), headline)

    @property
    def roles(self) -> list[tuple[str, int, int]]:
        """(role, workers, degree) of each worker role."""
        p = self.placement
        if p.mode is Mode.DISAGGREGATED:
            return [("prefill", p.num_prefill, p.prefill_degree), ("decode", p.num_decode, p.decode_degree)]
        return [("colocated", p.num_prefill, p.prefill_degree)]

    def engine_flags(self) -> list[str]:
        flags = ["--token-budget", str(self.token_budget), "--max-num-seqs", str(self.max_num_seqs)]
        if self.engine.kv_cache_bytes != EngineSettings().kv_cache_bytes:
            flags += ["--kv-cache-gb", f"{self.engine.kv_cache_bytes / (1 << 30):g}"]
        return flags

    def worker_flags(self, role: str, degree: int) -> list[str]:
        """A worker's flags after its role: threads (or the device), engine knobs, chunking."""
        flags = (["--threads", str(degree)] if self.cpu else ["--device", "cuda"]) + self.engine_flags()
        if role == "colocated" and self.placement.mode is Mode.CHUNKED:
            flags += ["--chunk-size", str(DEFAULT_CHUNK_SIZE)]
        if role == "colocated" and self.placement.mode is Mode.LAYERED:
            flags += ["--prefill-slice-ms", f"{DEFAULT_PREFILL_SLICE_MS:g}"]
        return flags


# -- splitserve up --------------------------------------------------------------------------------


def up_argv(d: Deployable) -> list[str]:
    p = d.placement
    argv = ["splitserve", "up", "--mode", p.mode.value]
    if p.mode is Mode.DISAGGREGATED:
        argv += ["--prefill", str(p.num_prefill), "--decode", str(p.num_decode)]
    else:
        argv += ["--colocated", str(p.num_prefill)]
    if d.cpu:  # up splits these evenly among the workers, prefill first: the planned shares
        argv += ["--cpus", format_cpus(list(range(p.resources)))]
    return argv + d.engine_flags() + ([] if d.cpu else ["--device", "cuda"])


def up_script(d: Deployable) -> str:
    where = (f"on cores 0-{d.placement.resources - 1} (edit --cpus for this host)" if d.cpu else
             "every worker on the same --device: one GPU per worker needs the compose or Kustomize files")
    return f"# {d.headline}\n# `splitserve up` {where}\n{shlex.join(up_argv(d))}\n"


# -- docker compose -------------------------------------------------------------------------------


def compose_override(d: Deployable, base: dict[str, Any] | None) -> dict[str, Any]:
    """Services to merge over docker-compose.yml (`docker compose -f docker-compose.yml -f FILE up`)."""
    services: dict[str, Any] = {}
    for role, count, degree in d.roles:
        service: dict[str, Any] = {"command": [role, *d.worker_flags(role, degree)], "deploy": {"replicas": count}}
        if d.cpu:
            service["cpus"] = degree
        else:
            service["deploy"]["resources"] = {"reservations": {"devices": [
                {"driver": "nvidia", "count": degree, "capabilities": ["gpu"]}]}}
        if role == "colocated":
            service = {**_colocated_service(base), **service}
        services[role] = service
    if d.placement.mode is not Mode.DISAGGREGATED:
        services |= {role: {"deploy": {"replicas": 0}} for role in ("prefill", "decode")}
    return {"services": services}


def _colocated_service(base: dict[str, Any] | None) -> dict[str, Any]:
    """docker-compose.yml's prefill service, built and tagged as the colocated target."""
    prefill = (base or {}).get("services", {}).get("prefill")
    if prefill is None:
        raise ValueError("a colocated service is derived from docker-compose.yml's prefill service: "
                         "give --compose-file")
    service = copy.deepcopy(prefill)
    service.get("build", {})["target"] = "colocated"
    if "image" in service:
        service["image"] = service["image"].replace("prefill", "colocated")
    return service


def compose_text(d: Deployable, base: dict[str, Any] | None) -> str:
    return (f"# {d.headline}\n# docker compose -f docker-compose.yml -f THIS_FILE up -d\n"
            + yaml.safe_dump(compose_override(d, base), sort_keys=False))


# -- Kustomize ------------------------------------------------------------------------------------


def kustomize_files(d: Deployable, base: str, base_dir: Path | None) -> dict[str, str]:
    """File name -> text of an overlay on `base` (as written in the overlay); base_dir is that base
    on disk, read for the prefill manifest a colocated worker is derived from."""
    replicas = [{"name": role, "count": count} for role, count, _ in d.roles]
    files = {f"{role}-patch.yaml": yaml.safe_dump(_patch(d, role, degree), sort_keys=False)
             for role, _, degree in d.roles}
    kustomization: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                     "resources": [base]}
    if d.placement.mode is not Mode.DISAGGREGATED:
        source = _base_file(base_dir, "prefill.yaml")
        files["colocated.yaml"] = yaml.safe_dump_all(_colocated_manifests(source), sort_keys=False)
        kustomization["resources"].append("colocated.yaml")
        kustomization["images"] = [{"name": "splitserve/colocated", "newTag": _prefill_tag(source.parent, d.cpu)}]
        replicas += [{"name": "prefill", "count": 0}, {"name": "decode", "count": 0}]
    kustomization["replicas"] = replicas
    kustomization["patches"] = [{"path": f"{role}-patch.yaml", "target": {"kind": "Deployment", "name": role}}
                                for role, _, _ in d.roles]
    header = f"# {d.headline}\n# kubectl apply -k THIS_DIRECTORY\n"
    return {"kustomization.yaml": header + yaml.safe_dump(kustomization, sort_keys=False), **files}


def _patch(d: Deployable, role: str, degree: int) -> list[dict[str, Any]]:
    """JSON patch of a worker Deployment: flags appended to its args (argparse keeps the last of a
    repeated flag, so --threads overrides the base's), and its CPU or GPU share."""
    container = "/spec/template/spec/containers/0"
    ops = [{"op": "add", "path": f"{container}/args/-", "value": flag} for flag in d.worker_flags(role, degree)]
    if d.cpu:
        return ops + [{"op": "add", "path": f"{container}/resources/{kind}/cpu", "value": str(degree)}
                      for kind in ("requests", "limits")]
    return ops + [{"op": "add", "path": f"{container}/resources/limits/nvidia.com~1gpu", "value": degree}]


def _base_file(base_dir: Path | None, name: str) -> Path:
    """A file of the base: in base_dir when it has one, else in this checkout's deploy/k8s/base."""
    for folder in (base_dir, REPO_BASE):
        if folder is not None and (folder / name).is_file():
            return folder / name
    raise ValueError(f"a colocated worker is derived from deploy/k8s/base/{name}, which was not found")


def _prefill_tag(folder: Path, cpu: bool) -> str:
    """The tag the base gives the prefill image (the colocated one is built alongside it)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text()) if (
        folder / "kustomization.yaml").is_file() else {}
    tags = [i.get("newTag") for i in kustomization.get("images", []) if i.get("name") == "splitserve/prefill"]
    tag = tags[0] if tags and tags[0] else "0.1.0-cpu"
    return tag if cpu else tag.replace("-cpu", "-cuda")


def _colocated_manifests(source: Path) -> list[dict[str, Any]]:
    """The prefill Service and Deployment of the base, renamed colocated: its port, no UCX port."""
    text = yaml.safe_dump_all(list(yaml.safe_load_all(source.read_text())))
    docs = list(yaml.safe_load_all(text.replace("prefill", "colocated").replace("50060", str(COLOCATED_PORT))))
    for doc in docs:
        spec = doc["spec"]
        if doc["kind"] == "Service":
            spec["ports"] = [p for p in spec["ports"] if p["name"] != "ucx"]
        else:
            container = spec["template"]["spec"]["containers"][0]
            container["ports"] = [p for p in container["ports"] if p["name"] != "ucx"]
            container["args"] = ["colocated"]  # the patch appends the rest
    return docs


def write_kustomize(d: Deployable, directory: Path, base: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    base_dir = (directory / base).resolve()
    written = []
    for name, text in kustomize_files(d, base, base_dir if base_dir.is_dir() else None).items():
        (directory / name).write_text(text)
        written.append(directory / name)
    return written

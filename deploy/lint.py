"""`make lint-deploy`: offline checks of deploy/ and docker-compose.yml; no cluster, no container engine.

- Kubernetes: each Kustomize build (deploy/k8s/base and every overlay) is rendered by `kustomize
  build`, else `kubectl kustomize`, and every object must pass `kubernetes-validate --strict`.
- Compose: docker-compose.yml, and the offline override deploy/compose.local.yml, must pass the
  compose-spec JSON schema (check-jsonschema's copy).
- Containerfiles: parsed with BuildKit's own parser (the `dockerfile` package); every file they copy
  or mount must exist and be in the build context that .dockerignore leaves.
- On top of the schemas, what issue 5 asks of these files (probes, health checks, scaling, GPU).

Prints one line per check and exits 1 on the first file that fails a check.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import dockerfile
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the tools installed beside this interpreter
K8S = ROOT / "deploy" / "k8s"
IMAGES = ROOT / "deploy" / "images"
WORKERS = ("prefill", "decode")


class LintError(Exception):
    """A deploy file that fails a check."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise LintError(message)


def run(command: list) -> subprocess.CompletedProcess:
    """Run a tool, capturing its output; the caller checks the exit code (and shows the output)."""
    return subprocess.run([str(part) for part in command], check=False, capture_output=True, text=True)


def kustomize_command() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    raise LintError("neither kustomize nor kubectl is on PATH: install one of them "
                    "(kubectl has kustomize built in) and run make lint-deploy again")


def render(build_dir: Path) -> str:
    result = run([*kustomize_command(), build_dir])
    check(result.returncode == 0, f"{build_dir.relative_to(ROOT)}: kustomize failed:\n{result.stderr}")
    return result.stdout


def validate_k8s(build_dir: Path) -> list[dict]:
    """Render one Kustomize build and validate every object strictly; returns the objects."""
    text = render(build_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as rendered:
        rendered.write(text)
        rendered.flush()
        result = run([BIN / "kubernetes-validate", "--strict", "--quiet", rendered.name])
    check(result.returncode == 0, f"{build_dir.relative_to(ROOT)}: kubernetes-validate --strict:\n"
                                  f"{result.stdout}{result.stderr}")
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def check_k8s_base(objects: list[dict]) -> None:
    deployments, services = by_kind(objects, "Deployment"), by_kind(objects, "Service")
    check(set(deployments) == {"gateway", "scheduler", *WORKERS}, f"Deployments: {sorted(deployments)}")
    redis = by_kind(objects, "StatefulSet").get("redis")
    check(redis is not None and redis["spec"].get("volumeClaimTemplates"), "Redis: a StatefulSet with a volume")
    check(services["prefill"]["spec"].get("clusterIP") == "None", "the prefill Service must be headless")
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        check("grpc" in container.get("readinessProbe", {}), f"{name}: a gRPC readiness probe")
        check(pod.get("securityContext", {}).get("runAsNonRoot"), f"{name}: runAsNonRoot")
        check(container.get("resources", {}).get("requests"), f"{name}: resource requests")
        if name in WORKERS:
            check("grpc" in container.get("livenessProbe", {}), f"{name}: a gRPC liveness probe")
            check("preStop" in container.get("lifecycle", {}), f"{name}: a preStop hook")
            check(pod.get("terminationGracePeriodSeconds", 0) >= 30, f"{name}: a termination grace period")
            env = {e["name"]: e for e in container.get("env", [])}
            check(env.get("SPLITSERVE_HOST", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                  == "status.podIP", f"{name}: SPLITSERVE_HOST from status.podIP (the address it advertises)")


def check_k8s_gpu(objects: list[dict]) -> None:
    for name in WORKERS:
        container = by_kind(objects, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]
        check(container["resources"]["limits"].get("nvidia.com/gpu"), f"gpu overlay: {name} gets a GPU")
        args = container["args"]
        check("--device" in args and args[args.index("--device") + 1] == "cuda",
              f"gpu overlay: {name} runs with --device cuda")
        check(container["image"].endswith("-cuda"), f"gpu overlay: {name} uses the CUDA image")


def lint_k8s() -> None:
    builds = [K8S / "base", *sorted(p.parent for p in K8S.glob("overlays/*/kustomization.yaml"))]
    for build_dir in builds:
        objects = validate_k8s(build_dir)
        check_k8s_base(objects)
        if build_dir.name == "gpu":
            check_k8s_gpu(objects)
        print(f"ok  {build_dir.relative_to(ROOT)}: {len(objects)} objects pass kubernetes-validate --strict")


def lint_compose(path: Path = ROOT / "docker-compose.yml") -> None:
    result = run([BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path])
    check(result.returncode == 0, f"{path.name}: compose-spec schema:\n{result.stdout}{result.stderr}")
    services = yaml.safe_load(path.read_text())["services"]
    for name, service in services.items():
        check("healthcheck" in service, f"{path.name}: {name} has no healthcheck")
        for dependency, condition in service.get("depends_on", {}).items():
            check(condition.get("condition") == "service_healthy",
                  f"{path.name}: {name} waits for {dependency} without condition: service_healthy")
    for name in WORKERS:  # --scale needs workers with no fixed name or host port
        check(not {"container_name", "ports", "hostname"} & set(services[name]), f"{path.name}: {name} cannot scale")
    check("--appendonly" in services["redis"]["command"], f"{path.name}: Redis without AOF")
    print(f"ok  {path.name}: compose-spec schema, health checks, depends_on healthy, scalable workers")


def lint_compose_override(path: Path = ROOT / "deploy" / "compose.local.yml",
                          base: Path = ROOT / "docker-compose.yml") -> None:
    """The offline override (make compose-test): valid compose, only services the base file has, its
    Containerfiles present, and what podman-compose 1.0.3 needs to scale prefill."""
    result = run([BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path])
    check(result.returncode == 0, f"{path.name}: compose-spec schema:\n{result.stdout}{result.stderr}")
    services = yaml.safe_load(path.read_text())["services"]
    base_services = yaml.safe_load(base.read_text())["services"]
    for name, service in services.items():
        check(name in base_services, f"{path.name}: {name} is not a service of {base.name}")
        dockerfile = service.get("build", {}).get("dockerfile")
        check(dockerfile is None or (ROOT / dockerfile).exists(), f"{path.name}: {name}: no {dockerfile}")
        check("BASE_IMAGE" in service.get("build", {}).get("args", {}), f"{path.name}: {name} builds without BASE_IMAGE")
    check(services["redis"]["image"] != base_services["redis"]["image"] and "build" in services["redis"],
          f"{path.name}: redis must be built locally, not pulled")
    check("replicas" in services["prefill"].get("deploy", {}), f"{path.name}: prefill without deploy.replicas")
    # podman-compose 1.0.3 pops "CMD" off a list test it shares between replicas: a second one fails.
    check(isinstance(base_services["prefill"]["healthcheck"]["test"], str),
          f"{base.name}: prefill's healthcheck test must be a string (podman-compose 1.0.3 --scale)")
    print(f"ok  {path.relative_to(ROOT)}: compose-spec schema, services of {base.name}, local Redis, prefill replicas")


def context_paths() -> list[str]:
    """The paths .dockerignore keeps (it ignores everything, then lists what the images need)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line[1:].rstrip("/") for line in lines if line.startswith("!")]


def sources(command: dockerfile.Command) -> list[str]:
    if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags):
        return list(command.value[:-1])
    mounts = [f.removeprefix("--mount=") for f in command.flags if f.startswith("--mount=")]
    return [kv.split("=", 1)[1] for m in mounts for kv in m.split(",") if kv.startswith("source=")]


def lint_containerfile(path: Path) -> None:
    commands = dockerfile.parse_file(str(path))
    kept = context_paths()
    for command in commands:
        for source in sources(command):
            check((ROOT / source).exists(), f"{path.name}:{command.start_line}: {source} does not exist")
            check(any(source == k or source.startswith(k + "/") for k in kept),
                  f"{path.name}:{command.start_line}: {source} is left out by .dockerignore")
    stages = [c.value[-1] for c in commands if c.cmd == "FROM"]
    final = stages[1:] if path.name.endswith(".worker") else stages[-1:]  # targets: every role's
    for stage in final:
        body = stage_commands(commands, stage)
        for needed in ("HEALTHCHECK", "CMD"):
            check(needed in body, f"{path.name}: stage {stage} has no {needed}")
    users = [c.value[0] for c in commands if c.cmd == "USER"]
    check(users and users[-1] not in ("0", "root"), f"{path.name}: must run as a non-root user")
    print(f"ok  {path.relative_to(ROOT)}: parses; {len(commands)} instructions; targets {', '.join(final)}")


def stage_commands(commands: list[dockerfile.Command], stage: str) -> set[str]:
    names, current = set(), None
    for command in commands:
        if command.cmd == "FROM":
            current = command.value[-1]
        elif current == stage:
            names.add(command.cmd)
    return names


def main() -> int:
    try:
        for path in sorted(IMAGES.glob("Containerfile.*")):
            lint_containerfile(path)
        lint_compose()
        lint_compose_override()
        lint_k8s()
    except LintError as exc:
        print(f"lint-deploy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make lint-deploy`: offline checks of deploy/ and docker-compose.yml; no cluster, no container engine.

- Kubernetes: each Kustomize build (deploy/k8s/base and every overlay) is rendered by `kustomize
  build`, else `kubectl kustomize`, and every object must pass `kubernetes-validate --strict`.
- Compose: docker-compose.yml, and the offline override deploy/compose.local.yml, must pass the
  compose-spec JSON schema (check-jsonschema's copy).
- Containerfiles: parsed with BuildKit's own parser (the `dockerfile` package); every file they copy
  or mount must exist and be in the build context that .dockerignore leaves.
- On top of the schemas, what issue 5 asks of these files (probes, health checks, scaling, GPU), and
  what issue 14 asks (secure by default): every service gets the cluster token and Redis's password
  from a required Secret (a file in compose), never a value on a command line; Redis asks for its
  password; the gateway requires its API key except in an overlay or override named for turning it
  off; NetworkPolicies leave only the gateway open and the prefill servers' KV ports to decode
  servers; the mTLS overlay gives each service its certificates and probes it over TLS.

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


def _grpc_probe(probe: dict) -> bool:
    """Kubernetes' own gRPC probe, or (under mutual TLS, which it cannot speak) the images' health check."""
    return "grpc" in probe or probe.get("exec", {}).get("command") == ["splitserve-healthcheck", "grpc"]


def services_of(objects: list[dict]) -> dict[str, dict]:
    """splitserve's own workloads by name: the Deployments and the schedulers' StatefulSet (not Redis)."""
    statefulsets = {k: v for k, v in by_kind(objects, "StatefulSet").items() if k != "redis"}
    return {**by_kind(objects, "Deployment"), **statefulsets}


def check_k8s_base(objects: list[dict]) -> None:
    deployments, services = by_kind(objects, "Deployment"), by_kind(objects, "Service")
    check(set(deployments) == {"gateway", *WORKERS}, f"Deployments: {sorted(deployments)}")
    redis = by_kind(objects, "StatefulSet").get("redis")
    check(redis is not None and redis["spec"].get("volumeClaimTemplates"), "Redis: a StatefulSet with a volume")
    schedulers = by_kind(objects, "StatefulSet").get("scheduler")
    check(schedulers is not None and schedulers["spec"]["replicas"] >= 2
          and services["scheduler"]["spec"].get("clusterIP") == "None",
          "the schedulers: a StatefulSet of 2 or more behind a headless Service (a leader and a standby)")
    config = next(iter(by_kind(objects, "ConfigMap").values()))["data"]
    check(config.get("SPLITSERVE_SCHEDULER", "").count(",") + 1 == schedulers["spec"]["replicas"],
          "SPLITSERVE_SCHEDULER names every scheduler replica")
    check(services["prefill"]["spec"].get("clusterIP") == "None", "the prefill Service must be headless")
    for name, deployment in services_of(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        check(_grpc_probe(container.get("readinessProbe", {})), f"{name}: a gRPC readiness probe")
        check(pod.get("securityContext", {}).get("runAsNonRoot"), f"{name}: runAsNonRoot")
        check(container.get("resources", {}).get("requests"), f"{name}: resource requests")
        if name in WORKERS:
            check(_grpc_probe(container.get("livenessProbe", {})), f"{name}: a gRPC liveness probe")
            check("preStop" in container.get("lifecycle", {}), f"{name}: a preStop hook")
            check(pod.get("terminationGracePeriodSeconds", 0) >= 30, f"{name}: a termination grace period")
            env = {e["name"]: e for e in container.get("env", [])}
            check(env.get("SPLITSERVE_HOST", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                  == "status.podIP", f"{name}: SPLITSERVE_HOST from status.podIP (the address it advertises)")


SECRET_FLAGS = ("--api-key", "--cluster-token", "--redis-password", "requirepass")


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(env: dict[str, dict], name: str) -> dict | None:
    return env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")


def check_k8s_secure(objects: list[dict], build: str) -> None:
    """The cluster's secrets come from required Secrets, never argv; Redis asks for its password; the
    gateway requires its key (unless build is named insecure-*); NetworkPolicies admit only what is needed."""
    for name, deployment in services_of(objects).items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = _env(container)
        for variable in ("SPLITSERVE_CLUSTER_TOKEN", "SPLITSERVE_REDIS_PASSWORD"):
            ref = _secret_ref(env, variable)
            check(ref is not None and not ref.get("optional"), f"{build}: {name}: {variable} from a required Secret")
        argv = " ".join(map(str, container.get("command", []) + container.get("args", [])))
        check(not any(flag in argv for flag in SECRET_FLAGS), f"{build}: {name}: a secret on the command line")
    gateway = _env(by_kind(objects, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0])
    if build.startswith("insecure-"):
        check(gateway.get("SPLITSERVE_REQUIRE_API_KEY", {}).get("value") == "0", f"{build}: says it turns the key off")
    else:
        ref = _secret_ref(gateway, "SPLITSERVE_API_KEY")
        check(ref is not None and not ref.get("optional"), f"{build}: the gateway's API key from a required Secret")
        check(gateway.get("SPLITSERVE_REQUIRE_API_KEY", {}).get("value") == "1", f"{build}: the gateway requires its key")
    redis = by_kind(objects, "StatefulSet")["redis"]["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(redis.get("command", []) + redis.get("args", []))
    check("requirepass" in script and "$REDIS_PASSWORD" in script and _secret_ref(_env(redis), "REDIS_PASSWORD"),
          f"{build}: Redis asks for the password of a Secret (requirepass, in a config file)")
    check("REDISCLI_AUTH" in " ".join(redis["readinessProbe"]["exec"]["command"]), f"{build}: Redis's probe AUTHs")
    policies = by_kind(objects, "NetworkPolicy")
    deny = [p for p in policies.values() if not p["spec"].get("ingress") and p["spec"]["policyTypes"] == ["Ingress"]]
    check(deny and {"gateway", "scheduler", "prefill", "decode", "redis"} <= set(
        deny[0]["spec"]["podSelector"]["matchExpressions"][0]["values"]), f"{build}: a default-deny ingress policy")
    for policy in policies.values():
        component = policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
        for rule in policy["spec"].get("ingress", []):
            check(component == "gateway" or rule.get("from"), f"{build}: {policy['metadata']['name']}: open to all")
        if component == "prefill":
            kv = [r for r in policy["spec"]["ingress"] if {p["port"] for p in r["ports"]} & {50061}]
            check(kv and all(f["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "decode"}
                             for r in kv for f in r["from"]), f"{build}: the UCX KV port only from decode servers")


def check_k8s_mtls(objects: list[dict]) -> None:
    for name, deployment in services_of(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        check(_env(container).get("SPLITSERVE_CLUSTER_TLS_DIR"), f"mtls overlay: {name} gets SPLITSERVE_CLUSTER_TLS_DIR")
        secrets = [v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v]
        check(f"splitserve-tls-{name}" in secrets, f"mtls overlay: {name} mounts splitserve-tls-{name}")
        if name != "gateway":  # the gateway's probes hit its client edge, not its cluster TLS
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                check("grpc" not in container.get(probe, {}), f"mtls overlay: {name}'s {probe} speaks no TLS")
                check(probe not in container or container[probe].get("timeoutSeconds", 1) >= 3,
                      f"mtls overlay: {name}'s {probe} gives splitserve-healthcheck (Python, a TLS handshake) 3 s")


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
        check_k8s_secure(objects, build_dir.name)
        if build_dir.name == "gpu":
            check_k8s_gpu(objects)
        if build_dir.name == "mtls":
            check_k8s_mtls(objects)
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
    redis_command = " ".join(services["redis"]["command"])
    check("--appendonly" in redis_command, f"{path.name}: Redis without AOF")
    check("requirepass" in redis_command and "/run/secrets/redis_password" in redis_command,
          f"{path.name}: Redis asks for the password of the redis_password secret")
    check("REDISCLI_AUTH" in services["redis"]["healthcheck"]["test"], f"{path.name}: Redis's health check AUTHs")
    secrets = yaml.safe_load(path.read_text()).get("secrets", {})
    check(all("file" in secrets.get(s, {}) for s in ("redis_password", "cluster_token", "api_key")),
          f"{path.name}: the secrets redis_password, cluster_token, api_key (files, made by make secrets)")
    schedulers = [name for name in services if name.startswith("scheduler")]
    check(len(schedulers) >= 2 and all(
        services[name]["environment"].get("SPLITSERVE_SCHEDULER") == ",".join(f"{s}:50052" for s in schedulers)
        for name in ("gateway", *WORKERS)), f"{path.name}: 2 schedulers, and the gateway and workers name each")
    check("--appendfsync always" in redis_command, f"{path.name}: Redis fsyncs each write (accepted requests survive)")
    for name in (*schedulers, "gateway", *WORKERS):
        env = services[name]["environment"]
        check(env.get("SPLITSERVE_CLUSTER_TOKEN_FILE") == "/run/secrets/cluster_token"
              and env.get("SPLITSERVE_REDIS_PASSWORD_FILE") == "/run/secrets/redis_password"
              and {"cluster_token", "redis_password"} <= set(services[name].get("secrets", [])),
              f"{path.name}: {name} reads the cluster token and Redis's password from its secrets")
        check(not any(k in env for k in ("SPLITSERVE_API_KEY", "SPLITSERVE_CLUSTER_TOKEN", "SPLITSERVE_REDIS_PASSWORD")),
              f"{path.name}: {name}: a secret's value in the compose file")
    gateway = services["gateway"]["environment"]
    check(gateway.get("SPLITSERVE_REQUIRE_API_KEY") == "1" and gateway.get("SPLITSERVE_API_KEY_FILE") == "/run/secrets/api_key",
          f"{path.name}: the gateway requires its API key, from the api_key secret")
    print(f"ok  {path.name}: compose-spec schema, health checks, depends_on healthy, scalable workers, secrets "
          f"(Redis password, cluster token, required API key) from files")


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

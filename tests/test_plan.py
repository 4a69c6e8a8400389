"""`splitserve plan`: the rate search, the placements and their ceilings, the ranking, the files it
writes, and the command end to end. Synthetic profiles where the answer can be worked by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from splitserve.bench.loadgen.config import BackendConfig, ServeConfig
from splitserve.bench.loadgen.metrics import Slo
from splitserve.bench.loadgen.workloads import fixed_workload
from splitserve.cli import build_parser
from splitserve.commands.up import split_cpus
from splitserve.planner import gpu_example
from splitserve.planner.latency import (
    DecodeModel,
    DegreeProfile,
    KvTransferModel,
    ModelInfo,
    Overheads,
    PrefillModel,
    Profile,
    load_profile,
)
from splitserve.planner.placements import Placement, WorkloadShape, ceiling, enumerate_placements
from splitserve.planner.plan import Candidate, Evaluation, Planner, PlanSpec, plan
from splitserve.planner.plan_writers import REPO_BASE, Deployable, compose_override, kustomize_files, up_argv
from splitserve.planner.rate_search import MIN_RATE, RateSearch, max_rate
from splitserve.planner.sim_engine import EngineSettings
from splitserve.planner.simulator import Mode, SimRequest
from splitserve.planner.sweep import PROFILES_DIR

ROOT = Path(__file__).resolve().parent.parent
SPLITSERVE = [sys.executable, "-m", "splitserve.cli"]
DISAGGREGATED = (Mode.DISAGGREGATED,)


def profile(prefill_per_token: float, decode_per_seq: float, degrees=(1,), device: bool = False) -> Profile:
    """Prefill costs prefill_per_token per prompt token (batching saves nothing); a decode step costs
    1 ms + decode_per_seq per sequence. No hops, no cluster overheads."""
    degree = DegreeProfile(1, PrefillModel(0.0, prefill_per_token, 0.0), DecodeModel(0.001, 0.0, decode_per_seq))
    machine = {"num_devices": 4} if device else {"num_cores": 4}
    return Profile("test", machine, ModelInfo("test", "bfloat16", 1000, 8192),
                   {d: replace(degree, degree=d) for d in degrees}, KvTransferModel(0.001, 10.0),
                   Overheads(0.0, 0.0, 0.0), "devices per worker" if device else "cores per worker")


# Prefill-bound: a 100-token prompt takes 0.1 s (10 req/s a prefill worker), one cheap decode step.
PREFILL_BOUND = profile(0.001, 0.0001)
PREFILL_WORK = fixed_workload(100, 2)
# Decode-bound: prompts are nearly free; 20 decode tokens of 10 ms a sequence (5 req/s a decode worker).
DECODE_BOUND = profile(0.00001, 0.01)
DECODE_WORK = fixed_workload(100, 21)


def spec(prof: Profile, workload, resources: int, slo: Slo, modes=DISAGGREGATED, **changes) -> PlanSpec:
    serve = ServeConfig(BackendConfig("simulate", "test"), workload, (), num_requests=100, slo=slo)
    return PlanSpec(prof, serve, resources, modes=modes, token_budgets=(2048,), max_num_seqs=(64,), **changes)


# -- the rate search ------------------------------------------------------------------------------


def test_the_search_brackets_a_threshold_within_the_tolerance():
    calls = []

    def attainment(rate):
        calls.append(rate)
        return 1.0 if rate <= 3.7 else 0.5

    found = max_rate(attainment, 0.9, guess=100.0)
    assert 3.7 / 1.02 <= found.max_rate <= 3.7 < found.first_failing <= found.max_rate * 1.02
    assert found.attainment == 1.0 and found.num_simulations == len(set(calls))
    # From a bracket that still holds: two simulations, the same answer.
    again = max_rate(attainment, 0.9, guess=1.0, bracket=found.bracket)
    assert (again.max_rate, again.first_failing, again.num_simulations) == (found.max_rate, found.first_failing, 2)


def test_the_search_reports_its_limits():
    nothing = max_rate(lambda rate: 0.0, 0.9, guess=5.0)
    assert nothing.max_rate is None and nothing.first_failing == MIN_RATE and nothing.bracket is None
    everything = max_rate(lambda rate: 1.0, 0.9, guess=5.0)
    assert everything.first_failing is None and everything.max_rate >= 1e5


def test_the_planned_rate_meets_the_attainment_and_the_next_step_does_not():
    planner = Planner(spec(PREFILL_BOUND, PREFILL_WORK, 2, Slo(0.5, None, 0.9)))
    cluster = Placement(Mode.DISAGGREGATED, 1, 1, 1, 1).cluster(EngineSettings())
    found = planner.evaluate(Candidate(Placement(Mode.DISAGGREGATED, 1, 1, 1, 1), 2048, 64)).search
    assert planner.simulate(cluster, found.max_rate).slo.attainment >= 0.9
    assert planner.simulate(cluster, found.first_failing).slo.attainment < 0.9
    assert found.first_failing / found.max_rate <= 1.02
    assert 5 < found.max_rate < 10.5  # one prefill worker serves at most 10 req/s (+ a finite run's slack)


# -- placements, ceilings, goodput per core -------------------------------------------------------


def test_placements_are_those_splitserve_up_can_start_with_the_profile_s_degrees():
    found = enumerate_placements(profile(0.001, 0.001, degrees=(1, 2)), 3, (Mode.DISAGGREGATED, Mode.COLOCATED))
    names = {p.describe() for p in found}
    assert "1P x2 + 1D x1" in names and "1P x1 + 1D x2" not in names  # up gives the remainder to prefill
    assert {"1P x1 + 1D x1", "2P x1 + 1D x1", "1P x1 + 2D x1", "3 colocated x1", "1 colocated x2"} <= names
    assert all(p.resources <= 3 and p.degrees <= {1, 2} for p in found)
    assert "1P x4 + 1D x1" not in {p.describe() for p in enumerate_placements(PREFILL_BOUND, 8, DISAGGREGATED)}
    # Devices are not split by `splitserve up`: any mix of degrees goes.
    gpu = enumerate_placements(profile(0.001, 0.001, degrees=(1, 2), device=True), 3, DISAGGREGATED)
    assert "1P x1 + 1D x2" in {p.describe() for p in gpu}


def test_the_ceiling_is_each_role_s_work_per_request():
    shape = WorkloadShape.of([SimRequest(0, 0.0, 100, 21)])
    # prefill: 100 tokens x 1 ms = 0.1 s; decode: 20 tokens x (1 ms / 64 + 0.1 ms)
    two_prefill = Placement(Mode.DISAGGREGATED, 2, 1, 1, 1)
    assert ceiling(two_prefill, PREFILL_BOUND, shape, 64) == pytest.approx(20.0)
    assert ceiling(Placement(Mode.DISAGGREGATED, 1, 1, 1, 1), DECODE_BOUND, shape, 64) == pytest.approx(
        1 / (20 * (0.001 / 64 + 0.01)))
    colocated = Placement(Mode.COLOCATED, 1, 1)
    assert ceiling(colocated, PREFILL_BOUND, shape, 64) == pytest.approx(1 / (0.1 + 20 * (0.001 / 64 + 0.0001)))


def test_goodput_per_core_is_the_rate_over_the_cores_used():
    placement = Placement(Mode.DISAGGREGATED, 2, 2, 1, 1)
    evaluation = Evaluation(Candidate(placement, 2048, 64), RateSearch(3.0, 3.06, 0.95, 7), None)
    assert placement.resources == 5 and evaluation.goodput_per_unit == pytest.approx(0.6)
    assert Evaluation(Candidate(placement, 2048, 64), RateSearch(None, MIN_RATE, None, 9), None).goodput_per_unit == 0


# -- the search finds what a hand calculation says --------------------------------------------------


def test_a_prefill_bound_workload_gets_more_prefill_workers():
    result = plan(spec(PREFILL_BOUND, PREFILL_WORK, 3, Slo(0.5, None, 0.9)))
    assert result.best.candidate.placement == Placement(Mode.DISAGGREGATED, 2, 1, 1, 1)
    by_name = {e.candidate.placement.describe(): e for e in result.evaluations}
    assert by_name["2P x1 + 1D x1"].max_rate > 1.7 * by_name["1P x1 + 1D x1"].max_rate


def test_a_decode_bound_workload_gets_more_decode_workers():
    result = plan(spec(DECODE_BOUND, DECODE_WORK, 3, Slo(None, 0.05, 0.9)))
    assert result.best.candidate.placement == Placement(Mode.DISAGGREGATED, 1, 1, 2, 1)
    assert result.baseline is None  # `splitserve up` gives 2 of 3 cores to prefill: no 2-core model here
    with_two = Planner(spec(profile(0.00001, 0.01, degrees=(1, 2)), DECODE_WORK, 3, Slo(None, 0.05, 0.9)))
    assert with_two.baseline().candidate.placement == Placement(Mode.DISAGGREGATED, 1, 2, 1, 1)


def test_pruning_skips_what_cannot_win_and_changes_nothing():
    pruned = plan(spec(PREFILL_BOUND, PREFILL_WORK, 4, Slo(0.5, None, 0.9)))
    exhaustive = plan(spec(PREFILL_BOUND, PREFILL_WORK, 4, Slo(0.5, None, 0.9), prune=False))
    assert {p.placement.describe() for p in pruned.pruned} >= {"1P x1 + 3D x1"}
    assert pruned.best.candidate == exhaustive.best.candidate
    assert pruned.num_simulations < exhaustive.num_simulations


def test_the_token_budgets_are_searched_and_the_best_kept():
    # A prefill batch costs 50 ms + 1 ms/token: a budget of 100 runs the 100-token prompts one by
    # one, larger ones batch them (less fixed cost, but each waits for the whole batch).
    prof = replace(PREFILL_BOUND, degrees={1: replace(PREFILL_BOUND.degrees[1], prefill=PrefillModel(0.05, 0.001, 0))})
    result = plan(replace(spec(prof, PREFILL_WORK, 2, Slo(0.5, None, 0.9)), token_budgets=(100, 400, 2048)))
    budgets = {e.candidate.token_budget: e.max_rate for e in result.evaluations}
    assert set(budgets) == {100, 400, 2048} and len(set(budgets.values())) > 1
    assert result.best.max_rate == max(budgets.values())


# -- the files ------------------------------------------------------------------------------------


def deployable(placement: Placement, cpu: bool = True) -> Deployable:
    prof = PREFILL_BOUND if cpu else profile(0.001, 0.001, degrees=(1, 2), device=True)
    best = Evaluation(Candidate(placement, 512, 32), RateSearch(1.5, 1.52, 0.91, 8), None)
    return Deployable.of(best, prof, EngineSettings(), "test plan")


def test_the_up_arguments_are_up_s_own_flags_and_give_each_worker_its_cores():
    placement = Placement(Mode.DISAGGREGATED, 1, 2, 1, 1)
    argv = up_argv(deployable(placement))
    args = build_parser().parse_args(argv[1:])  # up's real parser
    assert (args.command, args.mode, args.prefill, args.decode) == ("up", "disaggregated", 1, 1)
    assert (args.token_budget, args.max_num_seqs) == (512, 32)
    assert [len(share) for share in split_cpus(args.cpus, 2)] == [2, 1]
    colocated = build_parser().parse_args(up_argv(deployable(Placement(Mode.CHUNKED, 3, 1)))[1:])
    assert (colocated.mode, colocated.colocated, colocated.cpus) == ("chunked", 3, [0, 1, 2])


def test_the_compose_override_scales_the_services_and_passes_worker_flags():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    override = yaml.safe_load(yaml.safe_dump(compose_override(deployable(Placement(Mode.DISAGGREGATED, 2, 1, 1, 2)),
                                                              compose)))
    services = override["services"]
    assert set(services) <= set(compose["services"])
    assert services["prefill"]["deploy"]["replicas"] == 2 and services["decode"]["cpus"] == 2
    decode = build_parser().parse_args(services["decode"]["command"])
    assert (decode.command, decode.threads, decode.token_budget, decode.max_num_seqs) == ("decode", 2, 512, 32)


def test_a_colocated_plan_adds_a_colocated_service_and_stops_the_others():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose_override(deployable(Placement(Mode.CHUNKED, 2, 1)), compose)["services"]
    assert services["prefill"] == services["decode"] == {"deploy": {"replicas": 0}}
    colocated = services["colocated"]
    assert colocated["build"]["target"] == "colocated" and "colocated" in colocated["image"]
    assert colocated["environment"] == compose["services"]["prefill"]["environment"]
    args = build_parser().parse_args(colocated["command"])
    assert (args.command, args.chunk_size, args.threads) == ("colocated", 256, 1)


def render(files: dict[str, str], tmp_path: Path) -> list[dict]:
    """The overlay beside a copy of deploy/k8s/base, built by kustomize when one is installed."""
    shutil.copytree(REPO_BASE, tmp_path / "base")
    overlay = tmp_path / "overlays" / "plan"
    overlay.mkdir(parents=True)
    for name, text in files.items():
        (overlay / name).write_text(text)
    tool = shutil.which("kubectl")
    if tool is None:
        return []
    out = subprocess.run([tool, "kustomize", str(overlay)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return list(yaml.safe_load_all(out.stdout))


def test_the_kustomize_overlay_sets_replicas_args_and_cpus(tmp_path):
    files = kustomize_files(deployable(Placement(Mode.DISAGGREGATED, 3, 1, 1, 1)), "../../base", REPO_BASE)
    kustomization = yaml.safe_load(files["kustomization.yaml"])
    assert kustomization["resources"] == ["../../base"]
    assert {r["name"]: r["count"] for r in kustomization["replicas"]} == {"prefill": 3, "decode": 1}
    patch = yaml.safe_load(files["prefill-patch.yaml"])
    assert {"op": "add", "path": "/spec/template/spec/containers/0/resources/requests/cpu", "value": "1"} in patch
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(files, tmp_path)}
    if objects:
        prefill = objects["Deployment", "prefill"]
        container = prefill["spec"]["template"]["spec"]["containers"][0]
        args = build_parser().parse_args(container["args"])
        assert prefill["spec"]["replicas"] == 3 and (args.threads, args.token_budget) == (1, 512)
        assert container["resources"]["limits"]["cpu"] == "1"


def test_a_colocated_overlay_derives_a_colocated_deployment(tmp_path):
    files = kustomize_files(deployable(Placement(Mode.COLOCATED, 2, 1)), "../../base", REPO_BASE)
    manifests = {doc["kind"]: doc for doc in yaml.safe_load_all(files["colocated.yaml"])}
    assert manifests["Service"]["spec"]["ports"] == [
        {"name": "grpc", "port": 50080, "targetPort": "grpc", "appProtocol": "grpc"}]
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(files, tmp_path)}
    if objects:
        assert objects["Deployment", "prefill"]["spec"]["replicas"] == 0
        colocated = objects["Deployment", "colocated"]
        args = build_parser().parse_args(colocated["spec"]["template"]["spec"]["containers"][0]["args"])
        container = colocated["spec"]["template"]["spec"]["containers"][0]
        assert colocated["spec"]["replicas"] == 2 and args.command == "colocated" and args.threads == 1
        assert [p["containerPort"] for p in container["ports"]] == [50080]
        assert container["image"] == "splitserve/colocated:0.1.0-cpu"


def test_gpu_plans_are_written_one_device_per_worker_or_not_at_all():
    gpu = deployable(Placement(Mode.DISAGGREGATED, 1, 1, 2, 1), cpu=False)
    decode = compose_override(gpu, None)["services"]["decode"]
    assert decode["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert build_parser().parse_args(decode["command"]).device == "cuda"
    with pytest.raises(ValueError, match="tensor parallelism"):
        deployable(Placement(Mode.DISAGGREGATED, 1, 2, 1, 1), cpu=False)


# -- the GPU example profile and the command ------------------------------------------------------


def test_the_gpu_example_profile_is_distserve_s_numbers_in_seconds():
    shipped = load_profile(PROFILES_DIR / "a100-opt13b-distserve.json")
    assert shipped.to_json() == gpu_example.build().to_json()
    assert "EXAMPLE" in shipped.source and "DistServe" in shipped.source and "ESTIMATED" in shipped.source
    assert shipped.degrees[1].prefill.b == pytest.approx(0.09264750660897617 / 1e3)
    assert shipped.degrees[4].decode.a == pytest.approx(10.256231678259395 / 1e3)
    assert shipped.parallelism == "devices per worker" and sorted(shipped.degrees) == [1, 2, 4]


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SPLITSERVE, "plan", "--num-requests", "60", "--token-budgets", "2048",
                           "--max-num-seqs", "64", *args], capture_output=True, text=True, timeout=120)


def test_the_command_plans_for_the_shipped_profile_and_writes_its_files(tmp_path):
    out = run_plan("--workload", "chatbot", "--ttft-slo", "2", "--tpot-slo", "0.05",
                   "--json", str(tmp_path / "plan.json"), "--write-up-args", str(tmp_path / "up.sh"),
                   "--write-compose", str(tmp_path / "compose.yml"), "--compose-file", str(ROOT / "docker-compose.yml"),
                   "--write-kustomize", str(tmp_path / "k8s"))
    assert out.returncode == 0, out.stderr
    assert "placeholder" not in out.stderr and "best:" in out.stdout and "check it: splitserve bench serve" in out.stdout
    result = json.loads((tmp_path / "plan.json").read_text())
    assert result["format"] == "splitserve-plan/1" and result["search"]["resources"] == 2
    best = result["best"]
    assert best == result["evaluations"][0] and best["goodput_per_unit"] >= result["baseline"]["goodput_per_unit"]
    assert best["report"]["slo"]["attainment"] >= 0.9
    line = (tmp_path / "up.sh").read_text().splitlines()[-1].split()
    assert line[:2] == ["splitserve", "up"] and build_parser().parse_args(line[1:]).mode == best["placement"]["mode"]
    assert yaml.safe_load((tmp_path / "compose.yml").read_text())["services"]
    assert yaml.safe_load((tmp_path / "k8s" / "kustomization.yaml").read_text())["replicas"]


def test_the_command_plans_for_a_gpu_it_does_not_have(tmp_path):
    out = run_plan("--profile", str(PROFILES_DIR / "a100-opt13b-distserve.json"), "--workload", "chatbot",
                   "--ttft-slo", "0.25", "--tpot-slo", "0.1", "--resources", "2", "--degrees", "1",
                   "--json", str(tmp_path / "plan.json"), "--write-up-args", str(tmp_path / "up.sh"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "plan.json").read_text())
    assert result["search"]["unit"] == "device" and result["profile"]["model"] == "facebook/opt-13b"
    assert result["best"]["max_rate"] > 1  # an A100 serves OPT-13B chat at several requests a second
    assert "--device cuda" in (tmp_path / "up.sh").read_text()

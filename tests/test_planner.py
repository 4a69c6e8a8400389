"""The planner's latency model, its fit, and the cluster simulator on cases that can be worked by hand."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from splitserve.bench.loadgen.config import BackendConfig, ServeConfig, TraceReplay
from splitserve.bench.loadgen.metrics import Report, Slo, summarize
from splitserve.bench.loadgen.prompts import PromptFactory, SharedPrefix
from splitserve.bench.loadgen.records import RequestRecord
from splitserve.bench.loadgen.trace import read_trace
from splitserve.bench.loadgen.run import request_specs
from splitserve.bench.loadgen.workloads import fixed_workload, get_workload
from splitserve.engine.block_manager import block_hashes, blocks_for
from splitserve.planner.fit import fit_linear
from splitserve.planner.latency import (
    Contention,
    DecodeModel,
    DegreeProfile,
    KvTransferModel,
    ModelInfo,
    Overheads,
    PrefillModel,
    Profile,
    StepOverheads,
    fit_contention,
    fit_decode,
    fit_kv,
    fit_prefill,
    load_profile,
    save_profile,
)
from splitserve.planner.sim_engine import EngineSettings
from splitserve.planner.fidelity import prompt_factory, replayed_requests
from splitserve.planner.simulator import (
    ClusterSpec,
    Mode,
    SimRequest,
    Simulation,
    pick_prefill,
    serve_requests,
    simulate,
    workload_requests,
)
from splitserve.planner.sweep import DEFAULT_PROFILE, PROFILES_DIR

SPLITSERVE = [sys.executable, "-m", "splitserve.cli"]
KV_BYTES_PER_TOKEN = 1000
HOPS = Overheads(gateway_s=0.003, rpc_s=0.0015, reply_s=0.002)


def prefill_s(n: int) -> float:
    return 0.01 + 0.001 * n  # the test profile's prefill of one prompt


DECODE_S = 0.021  # the test profile's decode step at batch 1 (no context term)


def make_profile(**degree_changes) -> Profile:
    """Round numbers: prefill 10 ms + 1 ms/token, decode 20 ms + 1 ms/sequence, KV 5 ms + 1 GB/s."""
    degree = DegreeProfile(1, PrefillModel(0.01, 0.001, 0.0), DecodeModel(0.02, 0.0, 0.001))
    degree = replace(degree, **degree_changes)
    return Profile("test", {"num_cores": 2}, ModelInfo("test", "bfloat16", KV_BYTES_PER_TOKEN, 8192),
                   {1: degree, 2: replace(degree, degree=2)}, KvTransferModel(0.005, 1.0), HOPS)


def kv_s(prompt_len: int, block_size: int = 16) -> float:
    return 0.005 + blocks_for(prompt_len, block_size) * block_size * KV_BYTES_PER_TOKEN / 1e9


def requests(*specs: tuple[float, int, int]) -> list[SimRequest]:
    """(arrival_s, input_len, output_len) each."""
    return [SimRequest(i, t, n_in, n_out) for i, (t, n_in, n_out) in enumerate(specs)]


# -- the fit --------------------------------------------------------------------------------------


def test_the_fit_recovers_known_coefficients_from_exact_samples():
    batches = [[n] * k for n in (16, 128, 512, 2048) for k in (1, 2, 4) if n * k <= 4096] + [[1024, 64, 64]]
    truth = PrefillModel(0.012, 0.0007, 9e-8)
    fitted = fit_prefill([{"lens": b, "s": truth.seconds(b)} for b in batches])
    assert (fitted.a, fitted.b, fitted.c) == pytest.approx((truth.a, truth.b, truth.c), rel=1e-6)
    assert fitted.error.max_rel_error < 1e-9 and fitted.error.num_samples == len(batches)

    truth = DecodeModel(0.011, 1.4e-6, 7e-4)
    shapes = [[c] * b for c in (64, 256, 1024) for b in (1, 8, 32)]
    fitted = fit_decode([{"contexts": s, "s": truth.seconds(sum(s), len(s))} for s in shapes])
    assert (fitted.a, fitted.b, fitted.c) == pytest.approx((truth.a, truth.b, truth.c), rel=1e-6)

    kv = fit_kv([{"bytes": n, "s": 0.004 + n / 2.5e9} for n in (10**6, 10**7, 10**8)], "ucx")
    assert kv.latency_s == pytest.approx(0.004) and kv.bandwidth_gbps == pytest.approx(2.5)


def test_the_fit_keeps_coefficients_non_negative_and_reports_its_error():
    rng = random.Random(0)
    # Noisy samples of a model with no fixed cost: unconstrained, the intercept may go negative.
    lens = [[n] for n in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    samples = [{"lens": b, "s": 0.0014 * b[0] * rng.uniform(0.9, 1.1)} for b in lens]
    fitted = fit_prefill(samples)
    assert min(fitted.a, fitted.b, fitted.c) >= 0
    assert 0 < fitted.error.mean_rel_error <= fitted.error.max_rel_error < 0.2
    assert fitted.error.unconstrained_mean_rel_error <= fitted.error.mean_rel_error + 1e-12
    with pytest.raises(ValueError, match="at least 3 samples"):
        fit_linear([(1.0, 2.0, 3.0)], [1.0])


def test_a_profile_survives_a_round_trip_through_its_file(tmp_path):
    samples = [{"lens": [n], "s": prefill_s(n)} for n in (10, 100, 1000)]
    profile = make_profile(prefill=fit_prefill(samples), cluster=StepOverheads(1.1, 0.002, "x"),
                           samples={"prefill": samples}, contention=Contention(0.1, 0.2, 0.3, 0.4, "y"))
    profile = replace(profile, overheads=replace(HOPS, aux_cpu_per_token=0.001))
    save_profile(profile, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == profile
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a splitserve profile"):
        load_profile(tmp_path / "bad.json")


CPU_PROFILES = [DEFAULT_PROFILE, PROFILES_DIR / "cpu-2core-amd-epyc.json",
                PROFILES_DIR / "cpu-2core-amd-epyc-zen4.json"]


@pytest.mark.parametrize("path", CPU_PROFILES, ids=lambda p: p.name)
def test_the_shipped_profile_is_measured_calibrated_and_covers_both_placements(path):
    profile = load_profile(path)
    assert profile.source.startswith("measured by `splitserve profile") and "calibrated" in profile.source
    assert "placeholder" not in profile.source.lower()
    assert set(profile.degrees) == {1, 2} and profile.machine["num_cores"] == 2
    for d in profile.degrees.values():
        assert d.prefill.error.num_samples >= 30 and d.decode.error.num_samples >= 30 and d.mixed is not None
        assert d.cluster.notes.startswith("calibrated") and d.cluster.decode_s > 0
    assert profile.model.kv_bytes_per_token == 23040
    one, two = profile.degree(1), profile.degree(2)
    # Beside a busy core (measured), and the load-dependent CPU (measured on a loaded run).
    assert one.contention.notes.startswith("measured") and two.contention == Contention()
    o = profile.overheads
    assert 0 < o.aux_cpu_per_token + o.aux_cpu_per_step < 0.01 and 0 < o.kv_send_cpu_per_byte < 1e-7
    if o.aux_cpu_per_step:  # fitted to several loaded runs: per request too, and not per token
        assert 0.001 < o.aux_cpu_per_request < 0.1 and o.aux_cpu_per_token == 0
    assert one.prefill.seconds([512]) > two.prefill.seconds([512])  # one core is slower than two
    # A batch-1 step on one core: 8 ms on the AMD Zen 5 VM, 10-14 ms on the Zen 4 one; on the Sapphire
    # Rapids VM 20 ms on a normal day, 35 ms on the slow day it was profiled.
    assert 0.005 < one.decode.seconds(256, 1) < 0.04
    with pytest.raises(ValueError, match="has no latency model for 3"):
        profile.degree(3)


# -- the simulator, by hand -----------------------------------------------------------------------


def test_one_request_through_the_disaggregated_cluster():
    (record,) = simulate(make_profile(), ClusterSpec(), requests((0.0, 100, 4)))
    assert record.ok and record.completion_tokens == 4 and record.prompt_tokens == 100
    ttft = HOPS.gateway_s + HOPS.rpc_s + prefill_s(100) + HOPS.reply_s
    assert record.ttft_s == pytest.approx(ttft)
    # PrefillDone, Decode.Submit, the pull, then one decode step per token.
    handoff = 2 * HOPS.rpc_s + kv_s(100) + DECODE_S
    assert record.itls_s == pytest.approx([handoff, DECODE_S, DECODE_S])
    assert record.tpot_s == pytest.approx((handoff + 2 * DECODE_S) / 3)
    assert record.end_s == pytest.approx(record.chunk_times_s[-1])


def test_a_cached_prefix_is_not_computed_again_and_the_rest_is_priced_alone():
    prefix = tuple(block_hashes(list(range(1000, 1100)), 16))  # 6 full blocks of a 100-token prompt
    again = requests((0.0, 100, 2), (1.0, 100, 2))
    again = [replace(r, block_hashes=prefix) for r in again]
    first, second = simulate(make_profile(), ClusterSpec(), again)
    hops = HOPS.gateway_s + HOPS.rpc_s + HOPS.reply_s
    assert first.ttft_s == pytest.approx(hops + prefill_s(100))
    # 96 tokens (the blocks before the one holding the last token) hit: 4 are computed.
    assert second.ttft_s == pytest.approx(hops + prefill_s(4))
    off = ClusterSpec(engine=EngineSettings(enable_prefix_caching=False))
    assert [r.ttft_s for r in simulate(make_profile(), off, again)] == pytest.approx([first.ttft_s] * 2)


@pytest.mark.parametrize("routing, hits", [("kv", [96, 0]), ("least-loaded", [0, 0])])
def test_kv_aware_routing_sends_a_prompt_to_the_busier_server_holding_its_prefix(routing, hits):
    """As the scheduler does: prefill-0 holds the prefix and a 50-token prompt queued; the repeated
    prompt goes there (50 + 4 + 32 < 100) under KV routing, to the idle prefill-1 under least-loaded."""
    prefix = tuple(block_hashes(list(range(1000, 1100)), 16))
    reqs = requests((0.0, 100, 2), (1.0, 50, 2), (1.001, 100, 2))
    reqs = [replace(r, block_hashes=prefix) if r.input_len == 100 else r for r in reqs]
    sim = Simulation(make_profile(), ClusterSpec(num_prefill=2, routing=routing), reqs)
    assert all(r.ok for r in sim.run())
    assert [w.engine.blocks.stats.hits for w in sim.scheduler.takers] == hits


def test_the_simulator_and_a_replay_send_bench_serve_s_shared_system_prompts():
    shared = SharedPrefix(num_prompts=3, length=64)
    serve = ServeConfig(BackendConfig("simulate", "profile"), fixed_workload(32, 4), (1.0,), num_requests=12,
                        seed=3, shared_prefix=shared)
    sent = serve_requests(serve, 1.0, 16)
    factory = PromptFactory(3, 0, serve.token_range, (), shared)
    assert [r.arrival_s for r in sent] == [r.arrival_s for r in workload_requests(serve.workload, 1.0, 3,
                                                                                  num_requests=12)]
    assert all(r.input_len == 96 and r.block_hashes == tuple(block_hashes(factory.token_ids(r.index, 32), 16))
               for r in sent)
    by_prompt = {}
    for r in sent:  # requests of one system prompt share its 4 blocks, and nothing past them
        by_prompt.setdefault(factory.system_prompt_of(r.index), set()).add(r.block_hashes[:4])
    assert len({r.block_hashes[4] for r in sent}) == len(sent)
    assert len(by_prompt) == 3 and all(len(heads) == 1 for heads in by_prompt.values())
    # A replay of a real run rebuilds each point's prompts from its config and nonce.
    config = {"seed": 3, "token_range": list(serve.token_range),
              "shared_prefix": {"num_prompts": 3, "length": 64}}
    point = {"nonce": [11, 12, 13, 14]}
    records = [RequestRecord(i, 96, 4, 0.1 * i, send_s=0.1 * i) for i in range(3)]
    replayed = replayed_requests(records, prompt_factory(config, 2, point))
    real = PromptFactory(3, 2, serve.token_range, (11, 12, 13, 14), shared)
    assert [r.block_hashes for r in replayed] == [tuple(block_hashes(real.token_ids(i, 32), 16))
                                                  for i in range(3)]
    assert prompt_factory({"seed": 3}, 0, point) is None  # no shared prompts: nothing to rebuild


def test_simulate_replays_a_trace_with_its_shared_blocks(tmp_path):
    """`simulate --trace`: the trace's arrivals (stretched to the rate) and lengths, and its shared
    hash ids as shared blocks, which the simulated prefill server reuses."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 1000 * i, "input_length": 100, "output_length": 4,
                                         "hash_ids": [7, 8 + i % 2]}) + "\n" for i in range(6)))
    done = _run("simulate", "--trace", str(trace), "--trace-block-size", "64", "--rate", "1", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    (point,) = out["points"]
    assert point["report"]["completed"] == 6 and out["config"]["trace"]["num_requests"] == 6
    assert [r["input_len"] for r in point["records"]] == [100] * 6
    serve = ServeConfig(BackendConfig("simulate", "profile"), fixed_workload(1, 1), (1.0,), num_requests=6,
                        trace=TraceReplay(trace, tuple(read_trace(trace)), 64))
    sent = serve_requests(serve, 1.0, 16)
    assert [r.arrival_s for r in sent] == [float(i) for i in range(6)]
    # Hash id 7 (64 tokens, 4 blocks) starts every prompt; 8 and 9 alternate after it.
    assert len({r.block_hashes[:4] for r in sent}) == 1 and len({r.block_hashes[4] for r in sent}) == 2


def test_prompts_are_prefilled_first_come_first_served():
    # Prompts that arrive together, one per batch (token budget 100): first tokens in arrival order.
    cluster = ClusterSpec(engine=EngineSettings(token_budget=100))
    records = simulate(make_profile(), cluster, requests(*[(0.001 * i, 100 - i, 2) for i in range(6)]))
    first_tokens = [r.chunk_times_s[0] for r in records]
    assert first_tokens == sorted(first_tokens)
    gaps = [b - a for a, b in itertools.pairwise(first_tokens)]
    assert gaps == pytest.approx([prefill_s(100 - i) for i in range(1, 6)])  # back to back


def _profile_chosen_on(monkeypatch, processor: str, generation: dict[str, str]) -> str:
    """The name of the profile `sweep.machine_profile` picks on a processor of that name and
    generation (its cache cleared before and after)."""
    from splitserve.planner import sweep

    monkeypatch.setattr(sweep, "processor_name", lambda: processor)
    monkeypatch.setattr(sweep, "processor_generation", lambda: generation)
    sweep.machine_profile.cache_clear()
    try:
        return sweep.machine_profile().name
    finally:
        sweep.machine_profile.cache_clear()


def test_the_default_profile_is_the_one_shipped_for_this_processor(monkeypatch):
    """`up --mode auto`, `plan`, `simulate` and the re-planner default to the shipped profile measured
    on this processor: its model name, and its vendor, family and model where the profile records
    them (a VM's "AMD EPYC" is Zen 4 on one machine and Zen 5 on another, and their steps differ 2x),
    the profile that records more of them first; where none was, to the Sapphire Rapids VM's, with a
    warning that says so."""
    from structlog.testing import capture_logs

    from splitserve.planner import sweep

    zen = {"vendor": "AuthenticAMD"}
    for processor, generation, expected in (
            ("AMD EPYC", {**zen, "cpu_family": "26", "cpu_model": "2"}, "cpu-2core-amd-epyc.json"),
            ("AMD EPYC", {**zen, "cpu_family": "25", "cpu_model": "17"}, "cpu-2core-amd-epyc-zen4.json"),
            ("AMD EPYC", {**zen, "cpu_family": "25", "cpu_model": "1"}, None),
            ("AMD EPYC", {"vendor": "HygonGenuine", "cpu_family": "26", "cpu_model": "2"}, None),
            ("Intel(R) Xeon(R) Processor", {"vendor": "GenuineIntel", "cpu_family": "6", "cpu_model": "143"},
             "cpu-2core.json"),
            ("Some Other CPU", {}, None)):
        with capture_logs() as logs:
            chosen = _profile_chosen_on(monkeypatch, processor, generation)
        warned = [e for e in logs if e["log_level"] == "warning"]
        if expected is None:
            assert chosen == sweep.DEFAULT_PROFILE.name, (processor, generation)
            assert len(warned) == 1 and warned[0]["processor"] == processor, logs
        else:
            assert (chosen, warned) == (expected, []), (processor, generation)
    # One shipped CPU profile per processor and core count: the choice never falls to file order.
    shipped = [load_profile(p).machine for p in PROFILES_DIR.glob("*.json")]
    machines = [(m["processor"], m.get("cpu_family"), m.get("cpu_model"), m["num_cores"])
                for m in shipped if m["device"] == "cpu"]
    assert len(set(machines)) == len(machines) >= 3


def test_a_profile_that_records_the_processor_s_family_comes_before_one_that_records_only_its_name(
        monkeypatch, tmp_path):
    from splitserve.planner import sweep

    for name, extra in (("a-name-only.json", {}), ("b-family.json", {"cpu_family": "7"})):
        machine = {"processor": "X CPU", **extra, "num_cores": 2, "device": "cpu"}
        (tmp_path / name).write_text(json.dumps({"machine": machine}))
    monkeypatch.setattr(sweep, "PROFILES_DIR", tmp_path)
    for family, expected in (("7", "b-family.json"), ("8", "a-name-only.json")):
        assert _profile_chosen_on(monkeypatch, "X CPU", {"cpu_family": family}) == expected


def test_a_batch_takes_the_queue_head_within_the_token_budget():
    # 60 + 30 fit a 100-token budget, the third would not: it runs in the next batch.
    records = simulate(make_profile(), ClusterSpec(engine=EngineSettings(token_budget=100)),
                       requests((0.0, 50, 2), (0.01, 60, 2), (0.011, 30, 2), (0.012, 20, 2)))
    first = [r.chunk_times_s[0] for r in records]
    assert first[1] == pytest.approx(first[2]) and first[2] < first[3]
    assert first[1] - first[0] == pytest.approx(0.01 + 0.001 * 90)


def test_two_prefill_servers_halve_the_queueing():
    specs = [(0.0, 200, 2)] * 8  # all at once, one prompt per batch
    alone = HOPS.gateway_s + HOPS.rpc_s + prefill_s(200) + HOPS.reply_s
    queueing = {}
    for num_prefill in (1, 2):
        cluster = ClusterSpec(num_prefill=num_prefill, num_decode=2, engine=EngineSettings(token_budget=200))
        records = simulate(make_profile(), cluster, requests(*specs))
        queueing[num_prefill] = sum(r.ttft_s - alone for r in records) / len(records)
    assert queueing[1] == pytest.approx(prefill_s(200) * 3.5)  # waits of 0..7 prefills
    assert queueing[2] == pytest.approx(prefill_s(200) * 1.5)  # 0..3 on each server
    assert queueing[2] < queueing[1] / 2


def test_decode_admission_waits_for_free_blocks():
    # The decode cache holds 8 blocks of 16 tokens: one 100-token request with its output at a time.
    settings = EngineSettings(kv_cache_bytes=8 * 16 * KV_BYTES_PER_TOKEN)
    cluster = ClusterSpec(engine=settings)
    profile = make_profile()
    first, second = simulate(profile, cluster, requests((0.0, 100, 10), (0.0, 100, 10)))
    assert first.ok and second.ok
    assert second.chunk_times_s[1] > first.chunk_times_s[-1]  # its pull waited for the first to finish
    assert first.itls_s[1:] == pytest.approx([DECODE_S] * 8)  # never batched with the second
    big = ClusterSpec(engine=replace(settings, kv_cache_bytes=1 << 30))
    first, second = simulate(profile, big, requests((0.0, 100, 10), (0.0, 100, 10)))
    assert second.chunk_times_s[1] < first.chunk_times_s[-1]  # with room they decode together


def test_a_decode_server_out_of_blocks_preempts_and_recomputes():
    # Room for both prompts but not for both outputs: the newest is preempted, recomputed, finished.
    settings = EngineSettings(kv_cache_bytes=12 * 16 * KV_BYTES_PER_TOKEN)
    records = simulate(make_profile(), ClusterSpec(engine=settings), requests((0.0, 80, 60), (0.0, 80, 60)))
    assert all(r.ok and r.completion_tokens == 60 and len(r.chunk_times_s) == 60 for r in records)
    assert max(records[1].itls_s) > prefill_s(80 + 20)  # a recompute of prompt + outputs stalled it


def test_a_colocated_worker_stalls_its_decodes_while_a_prompt_prefills():
    reqs = requests((0.0, 20, 40), (0.3, 500, 2))  # a long prompt arrives mid-decode
    profile = make_profile()
    colocated = simulate(profile, ClusterSpec(Mode.COLOCATED), reqs)[0]
    assert max(colocated.itls_s) == pytest.approx(prefill_s(500) + DECODE_S, rel=0.05)
    disaggregated = simulate(profile, ClusterSpec(), reqs)[0]
    assert max(disaggregated.itls_s[1:]) == pytest.approx(DECODE_S + 0.001)  # batch 2 at most
    chunked = simulate(profile, ClusterSpec(Mode.CHUNKED), reqs)[0]
    # The stall is spread over two steps of 256 tokens, the prompt's chunks and the running decode.
    assert max(chunked.itls_s) == pytest.approx(0.01 + 0.001 * 256)
    assert sum(gap > 0.2 for gap in chunked.itls_s) == 2
    assert sum(chunked.itls_s) > sum(disaggregated.itls_s[1:])


def test_a_layered_worker_steps_its_decodes_between_slices_of_a_prompts_layers():
    reqs = requests((0.0, 20, 40), (0.3, 500, 2))  # a long prompt arrives mid-decode
    profile = make_profile()
    profile = replace(profile, model=replace(profile.model, num_layers=10))
    running, arriving = simulate(profile, ClusterSpec(Mode.LAYERED, prefill_slice_ms=30.0), reqs)
    part_s = prefill_s(500) / 20  # 25.5 ms: a 30 ms slice holds one layer part (half a layer)
    stalls = [gap for gap in running.itls_s if gap > DECODE_S + 0.002]
    # 19 slices each followed by a decode step, and the last one by the first step of batch 2.
    assert stalls == pytest.approx([part_s + DECODE_S] * 19 + [part_s + DECODE_S + 0.001], rel=0.02)
    colocated = simulate(profile, ClusterSpec(Mode.COLOCATED), reqs)[1]
    assert arriving.ttft_s > colocated.ttft_s + 19 * DECODE_S - 0.002  # the pass waited for 19 decode steps
    assert arriving.completion_tokens == 2


def test_a_chunked_step_of_decodes_alone_costs_a_decode_step():
    # A mixed fit whose fixed cost is near zero must not price a lone decode below the decode model.
    from splitserve.planner.latency import MixedModel

    profile = make_profile(mixed=MixedModel(0.0, 0.001, 0.0, 0.0))
    (record,) = simulate(profile, ClusterSpec(Mode.CHUNKED), requests((0.0, 100, 4)))
    assert record.itls_s == pytest.approx([DECODE_S] * 3)  # the decode model, not 1 ms per token
    assert record.ttft_s == pytest.approx(HOPS.gateway_s + HOPS.rpc_s + 0.001 * 100 + HOPS.reply_s)


def test_contention_is_the_mean_slowdown_of_each_kind_of_step_beside_each_kind_of_busy_core():
    def kinds(prefill: list[float], decode: list[float]) -> dict:
        return {"prefill": [{"lens": [64], "s": t} for t in prefill],
                "decode": [{"contexts": [256], "s": t} for t in decode]}

    contention = fit_contention({"alone": kinds([0.1, 0.2], [0.01, 0.02]),
                                 "beside prefill": kinds([0.11, 0.24], [0.011, 0.02]),
                                 "beside decode": kinds([0.13, 0.26], [0.009, 0.018])})
    assert contention.slowdown("prefill", "prefill") == pytest.approx(0.15)  # x1.1 and x1.2
    assert contention.slowdown("decode", "prefill") == pytest.approx(0.05)
    assert contention.slowdown("prefill", "decode") == pytest.approx(0.3)
    assert contention.slowdown("decode", "decode") == 0.0  # faster beside busy cores: noise, held at 0
    assert "prefill beside decode: x1.300 1.300" in contention.notes


def test_a_step_beside_a_busy_core_runs_slower_by_the_profile_s_contention():
    contention = Contention(prefill_beside_decode=0.2, decode_beside_prefill=0.5)
    profile = make_profile(contention=contention)
    # A long decode is running when a 500-token prompt comes: the prefill runs beside a decoding core.
    first, second = simulate(profile, ClusterSpec(), requests((0.0, 20, 200), (1.0, 500, 2)))
    assert second.ttft_s == pytest.approx(HOPS.gateway_s + HOPS.rpc_s + 1.2 * prefill_s(500) + HOPS.reply_s)
    # The decode steps that start during that prefill take 1.5 times as long; none of the others.
    slow = [gap for gap in first.itls_s[1:] if gap > DECODE_S + 0.0015]
    assert slow and slow == pytest.approx([1.5 * DECODE_S] * len(slow))
    assert sum(slow) == pytest.approx(1.2 * prefill_s(500), abs=1.5 * DECODE_S)
    # One worker on both of the machine's cores has no neighbour to slow it.
    alone = ClusterSpec(Mode.COLOCATED, prefill_degree=2)
    degree_two = replace(profile, degrees={**profile.degrees, 2: replace(profile.degree(2), contention=contention)})
    assert (simulate(degree_two, alone, requests((0.0, 500, 4)))[0].ttft_s
            == simulate(make_profile(), alone, requests((0.0, 500, 4)))[0].ttft_s)


def test_a_kv_send_delays_the_prefill_steps_that_start_before_it_is_done():
    kv_bytes = blocks_for(100, 16) * 16 * KV_BYTES_PER_TOKEN
    sending = replace(make_profile(), overheads=replace(HOPS, kv_send_cpu_per_byte=0.05 / kv_bytes))  # 50 ms
    first_done = HOPS.gateway_s + HOPS.rpc_s + prefill_s(100)
    send_start = first_done + 2 * HOPS.rpc_s  # PrefillDone, Decode.Submit, then the pull
    alone = HOPS.gateway_s + HOPS.rpc_s + prefill_s(100) + HOPS.reply_s
    for arrives, delay in ((send_start + 0.02, 0.03), (send_start + 0.06, 0.0)):  # at the prefill server
        sent = arrives - HOPS.gateway_s - HOPS.rpc_s
        records = simulate(sending, ClusterSpec(), requests((0.0, 100, 4), (sent, 100, 4)))
        assert records[1].ttft_s == pytest.approx(alone + delay)
    # A send that starts during another prompt's step runs once that step ends, then expires. (The
    # other prompt wants one token: it ends at its prefill and sends no KV of its own.)
    second_at_server = first_done + HOPS.rpc_s  # its step runs from here, across the send's start
    second_done = second_at_server + prefill_s(100)
    for arrives, delay in ((second_done + 0.02, 0.03), (second_done + 5.0, 0.0)):
        reqs = requests((0.0, 100, 4), (second_at_server - HOPS.gateway_s - HOPS.rpc_s, 100, 1),
                        (arrives - HOPS.gateway_s - HOPS.rpc_s, 100, 4))
        assert simulate(sending, ClusterSpec(), reqs)[2].ttft_s == pytest.approx(alone + delay)


def test_the_shared_services_cpu_comes_out_of_busy_cores_only():
    aux = replace(make_profile(), overheads=replace(HOPS, aux_cpu_per_token=0.01))  # 10 ms per token
    reqs = requests((0.0, 100, 200))
    # 1 + 1 one-core workers: while the decode server steps the prefill core is idle and does the work.
    assert simulate(aux, ClusterSpec(), reqs)[0].itls_s == simulate(make_profile(), ClusterSpec(), reqs)[0].itls_s
    # One worker on both cores: at a step of t seconds the services need 0.01 / t cores, half from each
    # busy core, so t = 0.021 / (1 - 0.005 / t), t = 26 ms (the rate is counted over one second).
    record = simulate(aux, ClusterSpec(Mode.COLOCATED, prefill_degree=2), reqs)[0]
    assert sorted(record.itls_s[-100:])[50] == pytest.approx(DECODE_S + 0.005, rel=0.02)


def test_the_shared_services_cpu_per_step_and_per_request_is_charged_at_their_rates():
    reqs = requests(*[(0.0, 100, 200)] * 4)  # four sequences decoding together on one worker, both cores
    cluster = ClusterSpec(Mode.COLOCATED, prefill_degree=2)

    def itl_p50(**aux) -> float:
        profile = replace(make_profile(), overheads=replace(HOPS, **aux))
        return sorted(simulate(profile, cluster, reqs)[0].itls_s[-100:])[50]

    # Every step emits 4 tokens: 10 ms per step is the CPU of 2.5 ms per token. The step of 24 ms at
    # batch 4 becomes t = 0.024 / (1 - 0.005 / t), t = 29 ms.
    per_step = itl_p50(aux_cpu_per_step=0.01)
    assert per_step == pytest.approx(itl_p50(aux_cpu_per_token=0.0025), rel=1e-6)
    assert per_step == pytest.approx(DECODE_S + 0.003 + 0.005, rel=0.02)
    # Admissions are charged in the second after them: four at once, 10 ms each, slow the steps of
    # that second only.
    profile = replace(make_profile(), overheads=replace(HOPS, aux_cpu_per_request=0.01))
    base = simulate(make_profile(), cluster, reqs)[0]
    admitted = simulate(profile, cluster, reqs)[0]
    assert admitted.ttft_s > base.ttft_s and admitted.itls_s[-1] == pytest.approx(base.itls_s[-1])


def test_the_gateway_refuses_beyond_max_pending():
    cluster = ClusterSpec(max_pending=3)
    records = simulate(make_profile(), cluster, requests(*[(0.0, 50, 4)] * 5))
    assert [r.ok for r in records] == [True, True, True, False, False]
    assert records[3].error.startswith("429")


# -- fidelity to the real code -------------------------------------------------------------------


def test_engine_and_cluster_defaults_match_the_real_flags():
    from splitserve.cli import build_parser
    from splitserve.commands.up import DEFAULT_CHUNK_SIZE, DEFAULT_PREFILL_SLICE_MS
    from splitserve.engine import EngineConfig

    config = EngineConfig()
    assert EngineSettings() == EngineSettings(config.token_budget, config.max_num_seqs, config.block_size,
                                              config.kv_cache_bytes)
    parse = build_parser().parse_args
    spec = ClusterSpec()
    assert spec.chunk_size == DEFAULT_CHUNK_SIZE and spec.prefill_slice_ms == DEFAULT_PREFILL_SLICE_MS
    from splitserve.commands.up import SIMULATED_MODES

    assert SIMULATED_MODES == tuple(m.value for m in Mode)
    assert config.prefill_slice_ms is EngineSettings().prefill_slice_ms is None
    assert spec.prefill_queue_factor == parse(["scheduler"]).prefill_queue_factor
    assert spec.heartbeat_interval_s == parse(["decode"]).heartbeat_interval
    assert spec.max_pending == int(parse(["gateway"]).max_pending)


def test_placement_picks_what_the_scheduler_s_registry_picks():
    from splitserve.services.scheduler.registry import Registry

    from splitserve.v1 import common_pb2 as pb
    from splitserve.v1 import scheduler_pb2 as spb

    rng = random.Random(1)
    takers = Simulation(make_profile(), ClusterSpec(num_prefill=3), []).scheduler.takers
    for _ in range(300):
        registry = Registry(2.0)
        for i, worker in enumerate(takers):
            worker.assigned = {f"r{i}-{k}": rng.choice((0, 100, 700, 1500)) for k in range(rng.randrange(4))}
            info = spb.WorkerInfo(instance_id=worker.name, role=spb.WORKER_ROLE_PREFILL, token_budget=2048)
            registry.register(info, pb.WorkerStats(), 0.0).assigned = dict(worker.assigned)
        n = rng.choice((50, 1000, 3000))
        real, simulated = registry.pick_prefill(n), pick_prefill(takers, n, 2.0)
        assert (real and real.instance_id) == (simulated and simulated.name)


def test_the_simulated_requests_are_the_ones_bench_serve_sends():
    workload = get_workload("chatbot")
    serve = ServeConfig(BackendConfig("openai", "http://x"), workload, (2.0,), num_requests=50, seed=3)
    sent = request_specs(serve, 2.0, PromptFactory(3))
    simulated = workload_requests(workload, 2.0, 3, num_requests=50)
    assert [(s.scheduled_s, s.input_len, s.output_len) for s in sent] == \
        [(r.arrival_s, r.input_len, r.output_len) for r in simulated]


def test_records_give_the_report_bench_serve_gives():
    profile = load_profile(DEFAULT_PROFILE)
    reqs = workload_requests(get_workload("code"), 2.0, 0, num_requests=60)
    for mode, degree in ((Mode.DISAGGREGATED, 1), (Mode.COLOCATED, 2), (Mode.CHUNKED, 2)):
        records = simulate(profile, ClusterSpec(mode, prefill_degree=degree, decode_degree=degree), reqs)
        report = summarize(records, Slo(1.0, 0.05))
        assert isinstance(report, Report) and report.completed == report.num_requests == 60
        assert all(r.completion_tokens == r.output_len == len(r.chunk_times_s) for r in records)
        assert report.ttft_ms.p50 > 0 and report.tpot_ms.p90 >= report.tpot_ms.p50 > 0
        assert 0 <= report.slo.attainment <= 1 and math.isfinite(report.duration_s)


# -- the commands ----------------------------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SPLITSERVE, *args], capture_output=True, text=True, timeout=120, check=False)


def test_the_planner_commands_have_help():
    for command, flag in (("simulate", "--cores-per-worker"), ("profile", "--quick")):
        out = _run(command, "--help")
        assert out.returncode == 0 and flag in out.stdout


def test_simulate_writes_what_bench_plot_and_rescore_read(tmp_path):
    from splitserve.bench.loadgen.plot import load_sweep
    from splitserve.bench.loadgen.rescore import load_points

    path = tmp_path / "sim.json"
    out = _run("simulate", "--workload", "code", "--rates", "1", "3", "--num-requests", "40", "--seed", "1",
               "--ttft-slo", "1", "--tpot-slo", "0.05", "--output", str(path))
    assert out.returncode == 0, out.stderr
    assert "simulated on 1 prefill x 1 + 1 decode x 1" in out.stdout and "sweep goodput" in out.stdout
    assert "warning" not in out.stderr  # the shipped profile is measured: no placeholder warning
    data = json.loads(path.read_text())
    assert data["format"] == "splitserve-bench-serve/1" and data["config"]["backend"] == "simulate"
    assert data["simulation"]["cluster"]["mode"] == "disaggregated"
    label, points = load_points(path)
    assert label == "disaggregated" and [rate for rate, _ in points] == [1.0, 3.0]
    assert load_sweep(path).rates == [1.0, 3.0]
    colocated = _run("simulate", "--mode", "colocated", "--workload", "code", "--num-requests", "20", "--json")
    assert colocated.returncode == 0, colocated.stderr
    assert json.loads(colocated.stdout)["simulation"]["cluster"]["prefill_degree"] == 2  # both cores


def test_simulate_refuses_a_placement_the_profile_does_not_cover():
    out = _run("simulate", "--cores-per-worker", "4", "--num-requests", "5")
    assert out.returncode == 2 and "no latency model for 4" in out.stderr and "Traceback" not in out.stderr


def test_the_simulator_runs_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from splitserve.planner.simulator import ClusterSpec, simulate, workload_requests\n"
            "from splitserve.planner.latency import load_profile\n"
            "from splitserve.planner.sweep import DEFAULT_PROFILE\n"
            "from splitserve.bench.loadgen.workloads import get_workload\n"
            "r = simulate(load_profile(DEFAULT_PROFILE), ClusterSpec(), "
            "workload_requests(get_workload('code'), 1.0, 0, num_requests=5))\n"
            "print(sum(x.ok for x in r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr


# -- fidelity: a real run replayed, and the calibration of a profile's overheads ---------------------


def test_fidelity_errors_are_points_for_attainment_and_relative_for_latencies():
    from splitserve.planner.fidelity import Figures, PointComparison

    real = Figures(0.90, 200.0, 400.0, 20.0, 40.0)
    sim = Figures(0.80, 240.0, 300.0, 20.0, None)
    c = PointComparison("chatbot", "colocated", 1.0, 40, real, sim)
    assert c.error("attainment") == pytest.approx(-10.0) and c.within("attainment")  # the bound itself
    assert c.error("ttft_p50") == pytest.approx(0.2) and c.within("ttft_p50")
    assert c.error("ttft_p90") == pytest.approx(-0.25) and not c.within("ttft_p90")
    assert c.error("tpot_p50") == 0.0 and c.within("tpot_p50")
    assert c.error("tpot_p90") is None and not c.within("tpot_p90")  # nothing to compare is no pass
    assert not replace(c, sim=replace(sim, attainment=0.79)).within("attainment")


def test_a_sweep_s_goodput_and_the_points_that_place_it_on_both_sides():
    from splitserve.planner.fidelity import Figures, PointComparison, RunComparison

    def point(rate: float, real: float, sim: float) -> PointComparison:
        return PointComparison("code", "colocated", rate, 40, Figures(real, 1.0, 1.0, 1.0, 1.0),
                               Figures(sim, 1.0, 1.0, 1.0, 1.0))

    run = RunComparison("x.json", 0.9, [point(1, 1.0, 1.0), point(2, 0.8, 0.95), point(3, 0.5, 0.7)])
    assert [c.rate for c in run.deciding] == [1, 2]  # up to the real sweep's first failing rate
    assert run.goodput("real").goodput_rps == pytest.approx(1.5)  # 1 + (1.0 - 0.9) / (1.0 - 0.8)
    assert run.goodput("sim").goodput_rps == pytest.approx(2 + 0.05 / 0.25)


def _bench_serve_file(path, label: str, records, slo: dict) -> None:
    """A `bench serve --output` document around these records: fixed 100-token prompts, 4 tokens out."""
    workload = {"name": "fixed", "description": "", "input": {"median": 100, "sigma": 0.0, "min": 100, "max": 100},
                "output": {"median": 4, "sigma": 0.0, "min": 4, "max": 4}}
    config = {"label": label, "workload": workload, "seed": 0, "burstiness": 1.0, "num_requests": len(records),
              "duration_s": None, "max_concurrency": 1, "slo": slo}
    points = [{"rate": 1.0, "records": [r.to_json() for r in records]}]
    path.write_text(json.dumps({"format": "splitserve-bench-serve/1", "config": config, "points": points}))


def test_fidelity_replays_the_real_requests_and_scores_both_sides_alike(tmp_path):
    from splitserve.bench.loadgen.records import RequestRecord
    from splitserve.planner import fidelity

    # Two requests sent 10 s apart, each alone in the cluster. The real cluster took 30% longer to
    # the first token than the simulated one does and decoded as fast.
    sim_ttft = HOPS.gateway_s + HOPS.rpc_s + prefill_s(100) + HOPS.reply_s
    handoff = 2 * HOPS.rpc_s + kv_s(100) + DECODE_S
    real = []
    for i, sent in enumerate((0.0, 10.0)):
        record = RequestRecord(i, 100, 4, sent, sent, completion_tokens=4, prompt_tokens=100)
        first = sent + 1.3 * sim_ttft
        for t in (first, first + handoff, first + handoff + DECODE_S, first + handoff + 2 * DECODE_S):
            record.add_chunk(t)
        record.end_s = record.chunk_times_s[-1]
        real.append(record)
    _bench_serve_file(tmp_path / "real.json", "disaggregated", real, {"ttft_s": 1.0, "tpot_s": 0.05, "target": 0.9})
    save_profile(make_profile(), tmp_path / "profile.json")
    ttft_slo = 1.15 * sim_ttft  # between the two: the real requests miss it, the simulated ones meet it
    assert fidelity.main([str(tmp_path / "real.json"), "--profile", str(tmp_path / "profile.json"),
                          "--slo", f"fixed={ttft_slo},0.05", "--output", str(tmp_path / "out.json")]) == 0
    (run,) = json.loads((tmp_path / "out.json").read_text())
    assert run["goodput"] == {"real": None, "sim": 1.0}  # the real run fails its only rate; "+" simulated
    (point,) = run["points"]
    assert point["mode"] == "disaggregated" and point["num_requests"] == 2
    assert point["real"]["attainment"] == 0.0 and point["sim"]["attainment"] == 1.0
    assert point["sim"]["ttft_p50"] == pytest.approx(sim_ttft * 1e3)
    assert point["error"]["ttft_p50"] == pytest.approx(1 / 1.3 - 1) and not point["within"]["ttft_p50"]
    assert point["error"]["tpot_p50"] == pytest.approx(0.0, abs=1e-9) and point["within"]["tpot_p90"]
    assert point["error"]["attainment"] == pytest.approx(100.0) and not point["within"]["attainment"]


def test_calibration_recovers_the_step_overheads_of_low_load_runs():
    from splitserve.planner.calibrate import measure_run, step_overheads
    from splitserve.planner.fidelity import default_cluster

    cluster = default_cluster("disaggregated", 2)
    assert (cluster.prefill_degree, cluster.decode_degree) == (1, 1)
    assert default_cluster("colocated", 2).prefill_degree == 2
    # "Real" runs: the same profile with known overheads, one request at a time, two prompt lengths.
    truth = StepOverheads(prefill_factor=1.5, prefill_s=0.04, decode_s=0.003)
    slowed = make_profile(cluster=truth)
    for name in ("disaggregated", "colocated"):
        c = default_cluster(name, 2)
        runs = [measure_run(make_profile(), c, simulate(slowed, c, requests(*[(5.0 * i, n, 64) for i in range(5)])),
                            f"{name}-{n}") for n in (256, 1024)]
        assert {r.degree for r in runs} == {c.prefill_degree}
        assert runs[0].hops == pytest.approx((HOPS.gateway_s + HOPS.rpc_s + HOPS.reply_s) * 1e3)
        assert runs[0].in_cluster_prefill == pytest.approx((1.5 * prefill_s(256) + 0.04) * 1e3)
        both = step_overheads(runs)
        assert (both.prefill_factor, both.prefill_s, both.decode_s) == pytest.approx((1.5, 0.04, 0.003))
        one = step_overheads(runs[:1])  # one length: all of it is a factor
        assert one.prefill_s == 0 and one.prefill_factor == pytest.approx(1.5 + 0.04 / prefill_s(256), rel=1e-4)


def test_calibration_measures_the_load_dependent_cpu_from_a_loaded_run_s_accounting(tmp_path, capsys):
    from splitserve.planner import calibrate

    profile = make_profile(cluster=StepOverheads(1.2, 0.003, prefill_s=0.01))
    save_profile(profile, tmp_path / "profile.json")
    cluster = ClusterSpec()
    low = []
    for n in (256, 1024):
        low.append(tmp_path / f"low-{n}.json")
        records = simulate(profile, cluster, requests(*[(5.0 * i, n, 64) for i in range(5)]))
        _bench_serve_file(low[-1], "disaggregated", records, {"ttft_s": 2.0, "tpot_s": 0.05, "target": 0.9})
    reqs = requests(*[(0.25 * i, 200, 64) for i in range(80)])
    loaded = simulate(profile, cluster, reqs)
    _bench_serve_file(tmp_path / "loaded.json", "disaggregated", loaded, {"ttft_s": 2.0, "tpot_s": 0.05, "target": 0.9})
    # The accounting of a cluster whose services spend 2 ms per token and whose prefill server spends
    # 5 ns per KV byte besides its steps (what the simulation above gives them).
    sim = Simulation(profile, cluster, reqs)
    sim.run()
    steps_s = sim.scheduler.takers[0].engine.busy_s
    kv_bytes = 80 * blocks_for(200, 16) * 16 * KV_BYTES_PER_TOKEN
    account = {"processes_cpu_s": {"gateway": 80 * 64 * 0.001, "scheduler": 80 * 64 * 0.0005, "redis": 1.0,
                                   "prefill": steps_s + kv_bytes * 5e-9, "decode": 30.0},
               "client_cpu_s": 80 * 64 * 0.0005 - 1.0}
    (tmp_path / "cpu.json").write_text(json.dumps(account))

    argv = ["--profile", str(tmp_path / "profile.json"), "--loaded", str(tmp_path / "loaded.json"),
            "--cpu", str(tmp_path / "cpu.json"), "--write"]
    assert calibrate.main(argv + [arg for path in low for arg in ("--run", str(path))]) == 0
    fitted = load_profile(tmp_path / "profile.json")
    assert fitted.overheads.aux_cpu_per_token == pytest.approx(0.002)
    assert fitted.overheads.kv_send_cpu_per_byte == pytest.approx(5e-9)
    c = fitted.degree(1).cluster  # low-load runs: the new terms leave the step overheads alone
    assert (c.prefill_factor, c.prefill_s, c.decode_s) == pytest.approx((1.2, 0.01, 0.003), rel=1e-3)
    assert "2.000 ms per token" in capsys.readouterr().out
    # Under load the terms slow the simulated cluster down.
    slower = summarize(simulate(fitted, cluster, reqs))
    assert slower.ttft_ms.p50 > summarize(loaded).ttft_ms.p50
    with pytest.raises(SystemExit):
        calibrate.main(argv[:4] + ["--run", str(low[0])])  # --loaded without --cpu


def test_calibration_prices_the_shared_cpu_per_request_and_per_step_from_two_loaded_runs(tmp_path, capsys):
    from splitserve.planner import calibrate

    profile = make_profile(cluster=StepOverheads(1.2, 0.003, prefill_s=0.01))
    save_profile(profile, tmp_path / "profile.json")
    cluster, slo = ClusterSpec(), {"ttft_s": 2.0, "tpot_s": 0.05, "target": 0.9}
    argv = ["--profile", str(tmp_path / "profile.json"), "--write"]
    for n in (256, 1024):  # two lengths: the low-load calibration gives back the profile's overheads
        records = simulate(profile, cluster, requests(*[(5.0 * i, n, 64) for i in range(5)]))
        _bench_serve_file(tmp_path / f"low-{n}.json", "disaggregated", records, slo)
        argv += ["--run", str(tmp_path / f"low-{n}.json")]
    # Two loaded runs: short outputs one at a time, long ones many at once. Their services spend 20 ms
    # per request and 0.5 ms per step that emits tokens, whatever the tokens.
    per_token = []
    for name, reqs in (("short", requests(*[(0.5 * i, 200, 8) for i in range(60)])),
                       ("long", requests(*[(0.1 * i, 50, 128) for i in range(60)]))):
        _bench_serve_file(tmp_path / f"{name}.json", "disaggregated", simulate(profile, cluster, reqs), slo)
        sim = Simulation(calibrate.without_load_terms(profile), cluster, reqs)
        sim.run()
        shared = 60 * 0.02 + sim.machine.num_emitting_steps * 0.0005
        per_token.append(shared / sum(r.output_len for r in reqs))
        account = {"processes_cpu_s": {"gateway": shared - 1.0, "redis": 1.0, "decode": 30.0,
                                       "prefill": sim.scheduler.takers[0].engine.busy_s},
                   "client_cpu_s": 0.0}
        (tmp_path / f"{name}.cpu.json").write_text(json.dumps(account))
        argv += ["--loaded", str(tmp_path / f"{name}.json"), "--cpu", str(tmp_path / f"{name}.cpu.json")]
    assert per_token[0] > 3 * per_token[1]  # per token the two runs are far apart
    assert calibrate.main(argv) == 0
    o = load_profile(tmp_path / "profile.json").overheads
    fitted = (o.aux_cpu_per_request, o.aux_cpu_per_step, o.aux_cpu_per_token)
    assert fitted == pytest.approx((0.02, 0.0005, 0.0), rel=0.02, abs=1e-9)
    assert "20.00 ms per request + 0.500 ms per step" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        calibrate.main(argv + ["--loaded", str(tmp_path / "long.json")])  # a --loaded without its --cpu

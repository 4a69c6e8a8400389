"""The `splitserve` command as a user runs it: real processes."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

SPLITSERVE = [sys.executable, "-m", "splitserve.cli"]


def run(*args, timeout=300):
    return subprocess.run([*SPLITSERVE, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_subcommands():
    out = run("--help")
    assert out.returncode == 0
    assert "generate" in out.stdout and "bench" in out.stdout
    engine_help = run("bench", "engine", "--help")
    assert engine_help.returncode == 0 and "--token-budget" in engine_help.stdout


def test_generate_prints_text_and_timings():
    # float32: exact against transformers, whose greedy answer here is "The capital of France is
    # Paris." (in bfloat16 its first token is a near-tie that rounding can flip).
    out = run("generate", "--local", "What is the capital of France?", "--max-tokens", "12", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "finish_reason=stop" in out.stderr and "ttft" in out.stderr


def test_generate_default_dtype_streams_the_requested_number_of_tokens():
    out = run("generate", "--local", "Count from one to twenty:", "--max-tokens", "10", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "10 generated, finish_reason=length" in out.stderr


def test_generate_rejects_bad_sampling_without_a_traceback():
    out = run("generate", "--local", "hi", "--temperature", "-1")
    assert out.returncode == 2
    assert "temperature must be >= 0" in out.stderr
    assert "Traceback" not in out.stderr


def test_bench_engine_quick_prints_consistent_json():
    out = run("--log-json", "bench", "engine", "--quick", "--no-transformers", "--steps", "2", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["machine"]["memory_read_gbps"] > 0
    assert {r["prompt_len"] for r in report["prefill"]} == {128, 512}
    assert {(r["batch"], r["context"]) for r in report["decode"]} == {(1, 256), (8, 256)}
    for row in report["prefill"] + report["decode"]:
        tokens = row["batch"] * row.get("prompt_len", 1)
        assert abs(row["tokens_per_s"] - tokens / (row["step_ms"] / 1e3)) < 0.01 * row["tokens_per_s"] + 1
        assert abs(row["pct_of_roofline"] - 100 * row["roofline_ms"] / row["step_ms"]) < 0.2
    assert "decode_batch1_pct" in report["targets"]


def test_bad_flags_and_model_paths_get_one_line_errors(tmp_path):
    cases = [
        (["generate", "--local", "hi", "--model", str(tmp_path)], "config.json"),
        (["generate", "--local", "hi", "--device", "nonsense"], "not a torch device"),
        (["generate", "--local", "hi", "--threads", "-1"], "must be a whole number >= 1"),
        (["generate", "--local", "hi", "--kv-cache-gb", "inf"], "must be a positive number"),
        (["bench", "engine", "--output", str(tmp_path / "missing" / "x.json")], "folder does not exist"),
        # auto is up's: the planner simulates placements, and had "'auto' is not a valid Mode" to say
        (["simulate", "--mode", "auto", "--workload", "w2"], "invalid choice: 'auto'"),
        (["plan", "--modes", "auto", "--workload", "w2"], "invalid choice: 'auto'"),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:  # each a process of its own: a second or two each
        outs = list(pool.map(lambda case: run(*case[0]), cases))
    for (argv, message), out in zip(cases, outs):
        assert out.returncode == 2, argv
        assert message in out.stderr, (argv, out.stderr[-500:])
        assert "Traceback" not in out.stderr, argv


def test_bench_engine_drops_a_transformers_step_faster_than_the_roofline():
    from splitserve.bench.engine_bench import plausible_baseline

    assert plausible_baseline(0.05, 0.02) == 0.05
    assert plausible_baseline(None, 0.02) is None
    # a difference of two generate() runs lost in noise: zero, negative or below the physical bound
    assert plausible_baseline(0.0, 0.02) is None
    assert plausible_baseline(-0.3, 0.02) is None
    assert plausible_baseline(0.01, 0.02) is None


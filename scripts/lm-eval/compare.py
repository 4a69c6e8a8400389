"""lm-evaluation-harness through splitserve against lm-eval's own transformers backend.

Runs the local tasks of this folder (splitserve_mc: loglikelihood over 4 choices; splitserve_gen:
greedy generate_until) twice, with lm-eval's `hf` model (transformers in this process, float32) and
with its `local-completions` model pointed at a running gateway's /v1/completions (the echo +
logprobs requests its loglikelihood tasks send), then compares the metrics and every sample:
each choice's loglikelihood, its is-greedy flag, the choice picked, and each generated answer.
Needs `pip install -e '.[eval]'`; scripts/lm-eval.sh starts the cluster and calls this.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TASKS = ["splitserve_mc", "splitserve_gen"]
HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model path or id (default: splitserve's default model)")
    parser.add_argument("--served-model-name", default=None, help="the gateway's name for it")
    parser.add_argument("--output", type=Path, default=None, help="write the figures and samples as JSON")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local JSON files only
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from splitserve.engine.loader import resolve_model

    source = resolve_model(args.model)
    name = args.served_model_name or source.name
    tasks = TaskManager(include_path=str(HERE))
    runs = {}
    for backend, model_args in [
        ("hf", f"pretrained={source.path},dtype=float32"),
        ("local-completions", f"model={name},base_url={args.url}/v1/completions,tokenizer_backend=huggingface,"
                              f"tokenizer={source.path},num_concurrent=1,max_retries=1,tokenized_requests=True"),
    ]:
        started = time.perf_counter()
        runs[backend] = simple_evaluate(model=backend, model_args=model_args, tasks=TASKS, task_manager=tasks,
                                        batch_size=1, device="cpu", log_samples=True)
        print(f"{backend}: {time.perf_counter() - started:.1f} s", flush=True)
    report = compare(runs["hf"], runs["local-completions"])
    print(json.dumps(report["summary"], indent=2))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["summary"]["same"] else 1


def compare(hf: dict, served: dict) -> dict:
    """Metrics side by side, and every sample's disagreements."""
    summary: dict = {"same": True}
    samples: dict = {}
    mc_hf, mc_served = _by_doc(hf, "splitserve_mc"), _by_doc(served, "splitserve_mc")
    diffs, greedy_flips, picks_differ = [], 0, 0
    rows = []
    for doc_id, a in mc_hf.items():
        b = mc_served[doc_id]
        ll_a = [float(r[0][0]) for r in a["resps"]]
        ll_b = [float(r[0][0]) for r in b["resps"]]
        diffs += [abs(x - y) for x, y in zip(ll_a, ll_b, strict=True)]
        greedy_flips += sum(bool(r[0][1]) != bool(s[0][1]) for r, s in zip(a["resps"], b["resps"], strict=True))
        picks_differ += int(_argmax(ll_a) != _argmax(ll_b))
        rows.append({"doc_id": doc_id, "hf": ll_a, "splitserve": ll_b})
    samples["splitserve_mc"] = rows
    gen_hf, gen_served = _by_doc(hf, "splitserve_gen"), _by_doc(served, "splitserve_gen")
    answers = [{"doc_id": d, "hf": gen_hf[d]["filtered_resps"][0], "splitserve": gen_served[d]["filtered_resps"][0]}
               for d in gen_hf]
    samples["splitserve_gen"] = answers
    different_answers = sum(a["hf"] != a["splitserve"] for a in answers)
    summary["splitserve_mc"] = {
        "acc": {"hf": float(hf["results"]["splitserve_mc"]["acc,none"]),
                "splitserve": float(served["results"]["splitserve_mc"]["acc,none"])},
        "docs": len(rows), "choices": len(diffs),
        "max_abs_loglikelihood_diff": max(diffs), "mean_abs_loglikelihood_diff": sum(diffs) / len(diffs),
        "is_greedy_flags_differing": greedy_flips, "picked_choices_differing": picks_differ,
    }
    summary["splitserve_gen"] = {
        "exact_match": {"hf": float(hf["results"]["splitserve_gen"]["exact_match,none"]),
                        "splitserve": float(served["results"]["splitserve_gen"]["exact_match,none"])},
        "docs": len(answers), "answers_differing": different_answers,
    }
    summary["same"] = (summary["splitserve_mc"]["acc"]["hf"] == summary["splitserve_mc"]["acc"]["splitserve"]
                       and picks_differ == 0 and different_answers == 0
                       and summary["splitserve_gen"]["exact_match"]["hf"]
                       == summary["splitserve_gen"]["exact_match"]["splitserve"])
    return {"summary": summary, "samples": samples}


def _by_doc(run: dict, task: str) -> dict[int, dict]:
    """doc id -> its samples merged: resps in the order of the doc's requests (one per choice)."""
    merged: dict[int, dict] = {}
    for sample in run["samples"][task]:
        merged[sample["doc_id"]] = sample
    return merged


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


if __name__ == "__main__":
    sys.exit(main())

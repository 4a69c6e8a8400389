"""gaps.txt: each run's time from first to second token, from `bench serve`'s full JSON (its records;
the copies kept beside this leave them out). Run in the ab.sh output folder:
python docs/figures/overload/gaps.py OUT_DIR > gaps.txt"""

import json
import statistics
import sys
from pathlib import Path

print("# python over each run's records (first to second token of each request)")
for path in sorted(Path(sys.argv[1]).glob("*-round*.json")):
    records = json.loads(path.read_text())["points"][0]["records"]
    gaps = sorted(r["chunk_times_s"][1] - r["chunk_times_s"][0] for r in records
                  if r["chunk_times_s"] and len(r["chunk_times_s"]) > 1)
    p90, p50 = gaps[int(0.9 * len(gaps))], statistics.median(gaps)
    print(f"{path.stem}: first to second token (a request whose KV waited: that wait, any runs again, the "
          f"pull and a step): max {gaps[-1]:.1f} s, P90 {p90:.1f}, P50 {p50:.1f}; "
          f"over 30 s (the lease): {sum(g > 30 for g in gaps)} requests")

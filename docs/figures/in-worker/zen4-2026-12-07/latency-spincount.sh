#!/bin/bash
cd "$(git rev-parse --show-toplevel)"
for r in 1 2; do for sc in default 30000 3000 300; do
  if [ $sc = default ]; then e=""; else e="GOMP_SPINCOUNT=$sc"; fi
  env $e .venv/bin/splitserve bench latency --cpus 0,1 --threads 2 --input-len 256 --output-len 64 --repeat 3 --batch 1 4 16 32 > /tmp/lat.json 2>/dev/null
  python3 - "$sc" <<'P'
import json,sys
d=json.load(open("/tmp/lat.json"))
rows = d if isinstance(d, list) else d.get("results", [d])
print(sys.argv[1].ljust(8), f"pf {d['prefill_ms']['p50']:.1f}", "  ".join(f"b{b}: {v['mean']:.2f}" for b, v in d['decode_step_ms_by_batch'].items()))
P
done; done

import json, statistics as st, collections
import sys
cl = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/client.json"))
stamps = [json.loads(l) for l in open(sys.argv[2] if len(sys.argv) > 2 else "/tmp/stamps.jsonl")]
byrid = collections.defaultdict(dict)
anon = []
for s in stamps:
    if s["rid"]:
        byrid[s["rid"]].setdefault(s["k"], s["t"])
    else:
        anon.append(s)
rows = collections.defaultdict(list)
for c in cl:
    rid = c["rid"]; b = byrid[rid]
    ft = b["ft"]
    # first xadd_begin / done / xread_ret after ft
    nxt = lambda k, t0: min((a["t"] for a in anon if a["k"] == k and a["t"] >= t0), default=None)
    xb = nxt("xadd_begin", ft); xd = nxt("xadd_done", xb); xr = nxt("xread_ret", xb)
    seq = [("send", c["send"]), ("arrival", c["arrival"]), ("queued", c["queued"]), ("sched_read", b.get("sched_read")),
           ("scheduled", c["scheduled"]), ("submit_out", b.get("submit_out")), ("submit_in", b.get("submit_in")),
           ("prefill_start", c["ps"]), ("prefill_end", c["pe"]), ("ft", ft), ("xadd_begin", xb), ("xread_ret", xr), ("routed", b.get("routed")),
           ("got", b.get("got")), ("processed", b.get("processed")), ("yield", b.get("yield")), ("client_first", c["first"])]
    for (a, ta), (bb, tb) in zip(seq, seq[1:]):
        rows[f"{a} -> {bb}"].append((tb - ta) * 1e3)
    rows["xadd_begin -> xadd_done"].append((xd - xb) * 1e3)
    rows["TTFT - prefill"].append(((c["first"] - c["send"]) - (c["pe"] - c["ps"])) * 1e3)
for k, v in rows.items():
    print(f"{k:32s} p50 {st.median(v):6.3f}  min {min(v):6.3f}  max {max(v):6.3f}")

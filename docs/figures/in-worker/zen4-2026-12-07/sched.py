import os, sys, time
pid = int(sys.argv[1]); dur = float(sys.argv[2])
def snap():
    d = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            run, wait, slices = map(int, open(f"/proc/{pid}/task/{t}/schedstat").read().split())
            comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            st = dict(l.split(":\t") for l in open(f"/proc/{pid}/task/{t}/status").read().splitlines() if "ctxt" in l)
            d[t] = (comm, run, wait, slices, int(st["voluntary_ctxt_switches"]), int(st["nonvoluntary_ctxt_switches"]))
        except Exception: pass
    return d
a = snap(); t0 = time.time(); time.sleep(dur); b = snap(); el = time.time() - t0
print(f"{'tid':>7} {'comm':16} {'run s':>7} {'rq wait s':>9} {'slices':>7} {'vol':>7} {'invol':>7}")
for t in sorted(b, key=lambda t: -(b[t][1] - a.get(t, b[t])[1])):
    if t not in a: continue
    x, y = a[t], b[t]
    if y[1] - x[1] < 1e7: continue
    print(f"{t:>7} {y[0]:16} {(y[1]-x[1])/1e9:7.2f} {(y[2]-x[2])/1e9:9.2f} {y[3]-x[3]:7} {y[4]-x[4]:7} {y[5]-x[5]:7}")
print("elapsed", round(el, 1))

import asyncio, json, random, sys, time
sys.path.insert(0, ".")
from splitserve.common.rpc import open_channel
from splitserve.common.auth import NO_AUTH
from splitserve.v1 import gateway_pb2, gateway_pb2_grpc
import grpc
async def main(addr, n):
    ch = grpc.aio.insecure_channel(addr)
    stub = gateway_pb2_grpc.GatewayStub(ch)
    rng = random.Random(1)
    out = []
    for i in range(n + 2):
        prompt = [rng.randrange(100, 40000) for _ in range(256)]
        req = gateway_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=4, min_tokens=4, ignore_eos=True, temperature=0.0)
        send = time.time(); first = None; rid = None; tl = None
        async for r in stub.Generate(req):
            now = time.time()
            if r.token_ids and first is None: first = now; rid = r.request_id
            if r.HasField("timeline") and r.timeline.finish: tl = r.timeline
        if i >= 2:
            out.append({"rid": rid, "send": send, "first": first, "arrival": tl.arrival, "queued": tl.queued, "scheduled": tl.scheduled, "ps": tl.prefill_start, "pe": tl.prefill_end, "ft": tl.first_token})
        await asyncio.sleep(0.3)
    json.dump(out, open("/tmp/client.json", "w"))
asyncio.run(main(sys.argv[1], int(sys.argv[2])))

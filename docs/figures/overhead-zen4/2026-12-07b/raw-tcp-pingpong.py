import asyncio, multiprocessing, sys, time, statistics as st
def server(port, ready):
    async def main():
        async def handle(r, w):
            while True:
                d = await r.read(100)
                if not d: return
                w.write(repr(time.time()).encode())
        s = await asyncio.start_server(handle, "127.0.0.1", port)
        ready.set()
        await s.serve_forever()
    asyncio.run(main())
async def client(port, gap, n):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    import socket
    w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    there, back = [], []
    for i in range(n + 3):
        await asyncio.sleep(gap)
        t0 = time.time(); w.write(b"x"); d = await r.read(100); t1 = time.time()
        if i >= 3: there.append((float(d) - t0) * 1e3); back.append((t1 - float(d)) * 1e3)
    return st.median(there), st.median(back)
if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn"); ready = ctx.Event()
    p = ctx.Process(target=server, args=(50991, ready), daemon=True); p.start(); ready.wait(10)
    for gap in (0.3, 0.02, 0.3, 0.02):
        print(gap, "there %.3f back %.3f" % asyncio.run(client(50991, gap, 40)))
    p.terminate()

"""`splitserve chaos`: a chaos soak of a whole local cluster, and the tally of what reached the clients.

It starts Redis (append-only file, fsync on every write) and, with `splitserve up`, 2 gateways, 2
schedulers (a leader and a standby), 2 prefill and 2 decode servers; drives Poisson load of greedy
streaming requests through both gateways; and every ~--fault-interval seconds does one fault at
random: SIGKILL of any one service (the leading scheduler included; `up` restarts it), SIGKILL of a
gateway with streams open, a Redis restart, a SIGSTOP of a worker for longer than the heartbeat
timeout, or a client that disconnects mid-stream.

Every request is judged against a fault-free greedy reference of its prompt, taken at the start:
- completed: every requested token, the reference's text, a stream ended by [DONE];
- failed: a clear error (an HTTP error or an SSE error event), by reason; one whose own gateway was
  killed while it ran is counted apart (its connection went with the gateway);
- lost: no answer by the deadline;
- corrupted: a stream that ended without its last event, or text or a token count differing from
  the reference.
Then it waits for the cluster to drain and checks that every worker's KV blocks are free, and reports
the peak RSS of each service. Refusals at admission (429, and 503 while Redis is away) are retried,
as a client would, until the request's deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

from splitserve.common.auth import REDIS_PASSWORD_ENV, TOKEN_ENV, ClusterAuth, new_token
from splitserve.common.engine_args import positive_float, positive_int
from splitserve.common.net import free_port
from splitserve.common.rpc import open_blocking_channel
from splitserve.queue.redis_server import LocalRedis
from splitserve.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.v1 import scheduler_pb2_grpc

FAULTS = ("kill", "kill_leader", "kill_gateway", "restart_redis", "stop_worker", "disconnect_client")
PROMPTS = 8  # distinct prompts, each with its reference output
WORKER_TIMEOUT_S = 5.0  # the scheduler's default --worker-timeout: a SIGSTOP outlasts it


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="a chaos soak of a local cluster: faults under load, and what clients got",
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=positive_float, default=600.0, help="seconds of load (default: 600)")
    p.add_argument("--rate", type=positive_float, default=1.0, help="requests per second, Poisson (default: 1)")
    p.add_argument("--fault-interval", type=positive_float, default=20.0,
                   help="seconds between faults, on average (default: 20)")
    p.add_argument("--faults", default=",".join(FAULTS),
                   help=f"which faults to draw from, comma-separated (default: all: {','.join(FAULTS)})")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="tokens per request (default: 32)")
    p.add_argument("--deadline", type=positive_float, default=180.0,
                   help="seconds a request may take before it counts as lost (default: 180)")
    p.add_argument("--prefill", type=positive_int, default=2, help="prefill servers (default: 2)")
    p.add_argument("--decode", type=positive_int, default=2, help="decode servers (default: 2)")
    p.add_argument("--kv-transport", choices=("ucx", "grpc"), default="ucx", help="(default: ucx)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals and the faults (default: 0)")
    p.add_argument("--log-dir", default=None, help="the services' logs (default: a new temp folder)")
    p.add_argument("--out", default=None, help="write the report as JSON here too")
    p.set_defaults(func=main)


@dataclass
class Service:
    name: str  # up's name: scheduler, scheduler-1, gateway, gateway-1, prefill-0, ...
    pid: int
    argv: list[str]

    def flag(self, name: str) -> str | None:
        return self.argv[self.argv.index(name) + 1] if name in self.argv[:-1] else None


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    disconnected: int = 0  # by the client, on purpose (a fault)
    failed: Counter = field(default_factory=Counter)  # reason -> count
    failed_gateway_died: int = 0
    lost: int = 0
    corrupted: Counter = field(default_factory=Counter)
    refusals_retried: int = 0


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)  # arrivals, prompts, victims
        self.fault_rng = random.Random(args.seed)  # which fault when: the same sequence every run
        self.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
        if not self.faults or set(self.faults) - set(FAULTS):
            raise ValueError(f"--faults: choose from {', '.join(FAULTS)}")
        self.token = new_token()
        self.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="splitserve-chaos-"))
        self.redis = LocalRedis(appendonly=True, password=new_token(), die_with_parent=True)
        self.http_port, self.grpc_port, self.scheduler_port = free_port(), free_port(), free_port()
        self.gateways: list[str] = []  # base URLs
        self.tally = Tally()
        self.events: list[dict] = []  # faults done, with their time
        self.gateway_kills: dict[int, list[float]] = defaultdict(list)  # gateway index -> kill times
        self.peak_rss_mb: dict[str, float] = defaultdict(float)
        self.in_flight: dict[int, asyncio.Task] = {}
        self.disconnect_next = False  # a disconnect fault with no stream open: the next one goes
        self.started = time.monotonic()

    # -- the cluster ------------------------------------------------------------------------------

    def start(self) -> None:
        self.redis.start()
        env = {**os.environ, TOKEN_ENV: self.token, REDIS_PASSWORD_ENV: self.redis.password}
        argv = [sys.executable, "-m", "splitserve.cli", "up", "--redis-url", self.redis.url,
                "--gateways", "2", "--schedulers", "2", "--prefill", str(self.args.prefill),
                "--decode", str(self.args.decode), "--kv-transport", self.args.kv_transport,
                "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                "--scheduler-port", str(self.scheduler_port), "--kv-cache-gb", "0.25", "--no-pin",
                "--threads-per-worker", "1", "--log-dir", str(self.log_dir)]
        self.up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        output = []
        for line in self.up.stdout:  # up's own word that the cluster is ready, then its endpoints
            output.append(line)
            if "Ctrl-C stops the cluster." in line:
                break
        else:
            raise OSError(f"splitserve up did not start:\n{''.join(output[-30:])}")
        second = re.search(r"gateway-1:\s+(http://\S+)/v1", "".join(output))
        self.gateways = [f"http://127.0.0.1:{self.http_port}", second.group(1)]
        # up goes on printing (restarts): drain its output so that it never blocks on a full pipe.
        threading.Thread(target=lambda: sys.stdout.writelines(f"up: {line}" for line in self.up.stdout),
                         daemon=True).start()

    def stop(self) -> int:
        self.up.send_signal(signal.SIGTERM)  # up drains and stops every service
        try:
            code = self.up.wait(120)
        except subprocess.TimeoutExpired:
            self.up.kill()
            code = self.up.wait()
        self.redis.stop()
        return code

    def services(self) -> list[Service]:
        """The cluster's service processes now (from /proc: up restarts them under new pids)."""
        found = []
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except (OSError, ValueError):
                continue
            if "splitserve.cli" in argv and self.redis.url in argv and "up" not in argv:
                service = Service("", int(proc.name), argv)
                service.name = self._service_name(service)
                if service.name:
                    found.append(service)
        return found

    def _service_name(self, service: Service) -> str | None:
        """up's name of the service a process runs (as its argv says)."""
        if any(role in service.argv for role in ("prefill", "decode", "colocated")):
            return service.flag("--instance-id")
        if "scheduler" in service.argv:
            consumer = service.flag("--consumer") or "scheduler-0"
            return "scheduler" if consumer == "scheduler-0" else consumer
        if "gateway" in service.argv:
            return "gateway" if service.flag("--http-port") == str(self.http_port) else "gateway-1"
        return None

    def schedulers(self) -> dict[str, spb.ClusterState | None]:
        """Each scheduler's ClusterState (None: it did not answer), by service name."""
        auth, states = ClusterAuth(self.token), {}
        for service in self.services():
            if not service.name.startswith("scheduler"):
                continue
            try:
                with open_blocking_channel(f"127.0.0.1:{service.flag('--port')}", auth, "scheduler") as channel:
                    states[service.name] = scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(
                        spb.ClusterStateRequest(), timeout=3, metadata=auth.metadata)
            except grpc.RpcError:
                states[service.name] = None
        return states

    def leader_name(self) -> str | None:
        return next((name for name, state in self.schedulers().items() if state and state.leader), None)

    def worker_stats(self) -> dict[str, common_pb2.WorkerStats]:
        state = next((s for s in self.schedulers().values() if s is not None), None)
        auth, stats = ClusterAuth(self.token), {}
        for worker in state.workers if state else []:
            stub = (decode_pb2_grpc.DecodeStub if worker.worker.role == spb.WORKER_ROLE_DECODE
                    else prefill_pb2_grpc.PrefillStub)
            try:
                with open_blocking_channel(worker.worker.grpc_address, auth, "decode") as channel:
                    stats[worker.worker.instance_id] = stub(channel).GetStats(common_pb2.StatsRequest(), timeout=3,
                                                                             metadata=auth.metadata)
            except grpc.RpcError:
                continue
        return stats

    # -- load ---------------------------------------------------------------------------------

    def prompt(self, i: int) -> str:
        return f"Chaos prompt {i}: write a short note about the river that runs through town number {i}"

    async def reference(self, session: aiohttp.ClientSession) -> dict[int, str]:
        refs = {}
        for i in range(PROMPTS):
            outcome, text = await self.request(session, 0, i)
            if outcome != "completed":
                raise OSError(f"the fault-free reference of prompt {i} failed: {outcome}")
            refs[i] = text
        return refs

    async def request(self, session: aiohttp.ClientSession, gateway: int, prompt: int,
                      reference: str | None = None, disconnect: asyncio.Event | None = None) -> tuple[str, str]:
        """(outcome, text): outcome is completed, disconnected, lost, 'failed: reason',
        'gateway died: reason' or 'corrupted: reason'."""
        started = time.monotonic()
        body = {"prompt": self.prompt(prompt), "max_tokens": self.args.max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        while True:
            left = self.args.deadline - (time.monotonic() - started)
            if left <= 0:
                return "lost", ""
            try:
                return await asyncio.wait_for(self._stream(session, gateway, body, reference, disconnect, started), left)
            except Refused as exc:  # as a client behind a load balancer would: again, at the other gateway
                self.tally.refusals_retried += 1
                if time.monotonic() - started + 0.5 >= self.args.deadline:
                    return f"failed: refused ({exc})", ""
                gateway = 1 - gateway
                await asyncio.sleep(0.5)
            except TimeoutError:
                return "lost", ""

    async def _stream(self, session, gateway: int, body: dict, reference: str | None,
                      disconnect: asyncio.Event | None, started: float) -> tuple[str, str]:
        text, usage, finish, done = "", None, None, False
        try:
            try:
                response = await session.post(self.gateways[gateway] + "/v1/completions", json=body)
            except aiohttp.ClientConnectorError as exc:  # nothing listens (a gateway restarting): not sent
                raise Refused(f"cannot connect: {type(exc).__name__}") from None
            async with response:  # leaving it before the end closes the connection: the client is gone
                if response.status in (429, 503):
                    raise Refused(f"HTTP {response.status}")
                if response.status != 200:
                    return f"failed: HTTP {response.status} {(await response.text())[:80]}", ""
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        return f"failed: {_reason(chunk['error'].get('message', ''))}", text
                    for choice in chunk.get("choices", []):
                        text += choice.get("text", "")
                        finish = choice.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
                    if disconnect is not None and disconnect.is_set() and text:
                        return "disconnected", text  # leaving the block closes the connection
        except (aiohttp.ClientError, ConnectionError) as exc:
            if self._gateway_died(gateway, started):
                return f"gateway died: {type(exc).__name__}", text
            return f"failed: connection lost ({type(exc).__name__})", text
        if not done:
            if self._gateway_died(gateway, started):
                return "gateway died: stream cut", text
            return "corrupted: the stream ended without its last event", text
        tokens = usage["completion_tokens"] if usage else None
        if finish != "length" or tokens != self.args.max_tokens:
            return f"corrupted: finish {finish}, {tokens} tokens", text
        if reference is not None and text != reference:
            return "corrupted: text differs from the fault-free reference", text
        return "completed", text

    def _gateway_died(self, gateway: int, since: float) -> bool:
        return any(t >= since for t in self.gateway_kills[gateway])

    async def load(self, session: aiohttp.ClientSession, references: dict[int, str]) -> None:
        """Open loop: each arrival at its own time, however late the previous one was sent."""
        start = time.monotonic()
        arrival, next_id = start + self.rng.expovariate(self.args.rate), 0
        while arrival < start + self.args.duration:
            await asyncio.sleep(max(0.0, arrival - time.monotonic()))
            arrival += self.rng.expovariate(self.args.rate)
            prompt, gateway = self.rng.randrange(PROMPTS), next_id % 2
            disconnect = asyncio.Event()
            if self.disconnect_next:
                disconnect.set()
                self.disconnect_next = False
            task = asyncio.create_task(self._one(session, gateway, prompt, references[prompt], disconnect))
            task.disconnect, task.gateway = disconnect, gateway
            self.in_flight[next_id] = task
            task.add_done_callback(lambda t, i=next_id: self.in_flight.pop(i, None))
            next_id += 1

    async def _one(self, session, gateway: int, prompt: int, reference: str, disconnect: asyncio.Event) -> None:
        self.tally.sent += 1
        outcome, _ = await self.request(session, gateway, prompt, reference, disconnect)
        kind, _, reason = outcome.partition(": ")
        if kind == "completed":
            self.tally.completed += 1
        elif kind == "disconnected":
            self.tally.disconnected += 1
        elif kind == "lost":
            self.tally.lost += 1
        elif kind == "gateway died":
            self.tally.failed_gateway_died += 1
        elif kind == "corrupted":
            self.tally.corrupted[reason] += 1
        else:
            self.tally.failed[reason] += 1

    # -- faults -------------------------------------------------------------------------------

    async def faults_forever(self) -> None:
        """One fault every fault_interval (0.5x to 1.5x), each kind once per round in a shuffled order."""
        bag: list[str] = []
        while True:
            await asyncio.sleep(self.fault_rng.uniform(0.5, 1.5) * self.args.fault_interval)
            if not bag:
                bag = self.fault_rng.sample(self.faults, len(self.faults))
            fault = bag.pop()
            try:
                detail = await self.do(fault)
            except Exception as exc:  # a fault that could not be done is reported, not fatal
                detail = f"not done: {exc!r}"
            self.events.append({"t_s": round(time.monotonic() - self.started, 1), "fault": fault, "detail": detail})
            print(f"chaos: {self.events[-1]['t_s']:7.1f} s  {fault}: {detail}", flush=True)

    async def do(self, fault: str) -> str:
        services = {s.name: s for s in self.services()}
        if fault == "kill":
            victim = services[self.rng.choice(sorted(services))]
            return self._kill(victim)
        if fault == "kill_leader":
            name = await asyncio.to_thread(self.leader_name)
            return self._kill(services[name]) if name else "no scheduler leads"
        if fault == "kill_gateway":  # the one with the most streams open, once one has some (up to 10 s)
            deadline = time.monotonic() + 10.0
            while not (open_streams := Counter(t.gateway for t in self.in_flight.values() if not t.done())) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            busiest = max((0, 1), key=lambda g: (open_streams[g], self.rng.random()))
            return self._kill(services["gateway" if busiest == 0 else "gateway-1"]) + \
                f", {open_streams[busiest]} streams open"
        if fault == "restart_redis":
            started = time.monotonic()
            await asyncio.to_thread(self.redis.restart)
            return f"redis down {time.monotonic() - started:.1f} s"
        if fault == "stop_worker":
            victim = services[self.rng.choice(sorted(n for n in services if n.split("-")[0] in ("prefill", "decode")))]
            os.kill(victim.pid, signal.SIGSTOP)
            await asyncio.sleep(WORKER_TIMEOUT_S + 2.0)
            os.kill(victim.pid, signal.SIGCONT)
            return f"{victim.name} stopped {WORKER_TIMEOUT_S + 2.0:.0f} s"
        streaming = [t for t in self.in_flight.values() if not t.done()]
        if not streaming:
            self.disconnect_next = True
            return "the next client goes away mid-stream"
        self.rng.choice(streaming).disconnect.set()
        return "a client goes away mid-stream"

    def _kill(self, victim: Service) -> str:
        if victim.name.startswith("gateway"):
            self.gateway_kills[0 if victim.name == "gateway" else 1].append(time.monotonic())
        os.kill(victim.pid, signal.SIGKILL)
        return f"SIGKILL {victim.name} (pid {victim.pid})"

    async def sample_rss_forever(self) -> None:
        while True:
            for service in self.services():
                kind = re.sub(r"-\d+$", "", service.name)
                try:
                    status = Path(f"/proc/{service.pid}/status").read_text()
                except OSError:
                    continue
                match = re.search(r"VmRSS:\s+(\d+) kB", status)
                if match:
                    self.peak_rss_mb[kind] = max(self.peak_rss_mb[kind], int(match.group(1)) / 1024)
            await asyncio.sleep(1.0)

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> dict:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            references = await self.reference(session)
            print(f"chaos: references taken; {self.args.duration:.0f} s of load at {self.args.rate} req/s, "
                  f"a fault every ~{self.args.fault_interval:.0f} s", flush=True)
            self.started = time.monotonic()
            background = [asyncio.create_task(self.faults_forever()), asyncio.create_task(self.sample_rss_forever())]
            await self.load(session, references)
            background[0].cancel()  # no fault during the drain
            while self.in_flight:
                await asyncio.wait(list(self.in_flight.values()))
            background[1].cancel()
        leaked = await asyncio.to_thread(self.leaked_blocks)
        return self.report(leaked)

    def leaked_blocks(self, timeout_s: float = 60.0) -> dict[str, int]:
        """KV blocks still held on each worker once the cluster had timeout_s to settle."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.worker_stats()
            held = {name: s.num_blocks - s.num_free_blocks for name, s in stats.items()}
            expected = self.args.prefill + self.args.decode
            if (len(stats) == expected and not any(held.values())) or time.monotonic() > deadline:
                return held
            time.sleep(1.0)

    def report(self, leaked: dict[str, int]) -> dict:
        t = self.tally
        return {
            "duration_s": self.args.duration, "rate": self.args.rate, "max_tokens": self.args.max_tokens,
            "fault_interval_s": self.args.fault_interval, "seed": self.args.seed,
            "sent": t.sent, "completed": t.completed, "failed": dict(t.failed),
            "failed_own_gateway_died": t.failed_gateway_died, "disconnected_by_client": t.disconnected,
            "lost": t.lost, "corrupted": dict(t.corrupted), "refusals_retried": t.refusals_retried,
            "kv_blocks_held_after_drain": leaked, "leaked": sum(leaked.values()),
            "peak_rss_mb": {k: round(v) for k, v in sorted(self.peak_rss_mb.items())},
            "faults": self.events, "log_dir": str(self.log_dir),
        }


class Refused(Exception):
    """429 or 503 at admission: the client retries."""


def _reason(message: str) -> str:
    """An error message without the parts that vary per request (ids, numbers)."""
    return re.sub(r"\d+(\.\d+)?", "N", re.sub(r"'[^']*'", "'…'", message))[:120]


def print_report(report: dict) -> None:
    rows = [("sent", report["sent"]), ("completed exactly", report["completed"]),
            ("failed, own gateway died", report["failed_own_gateway_died"]),
            ("failed, other reasons", sum(report["failed"].values())),
            ("disconnected by the client (a fault)", report["disconnected_by_client"]),
            ("lost", report["lost"]), ("corrupted", sum(report["corrupted"].values())),
            ("KV blocks held after drain", report["leaked"])]
    print("\nchaos report")
    for label, value in rows:
        print(f"  {label:<40} {value}")
    for reason, count in report["failed"].items():
        print(f"    failed: {reason}: {count}")
    for reason, count in report["corrupted"].items():
        print(f"    corrupted: {reason}: {count}")
    print(f"  faults: {Counter(e['fault'] for e in report['faults'])}")
    print(f"  peak RSS (MB): {report['peak_rss_mb']}")


def main(args: argparse.Namespace) -> int:
    soak = Soak(args)
    print(f"chaos: starting the cluster (logs in {soak.log_dir}) ...", flush=True)
    soak.start()
    try:
        report = asyncio.run(soak.run())
    finally:
        code = soak.stop()
    report["up_exit_code"] = code
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    ok = report["lost"] == 0 and not report["corrupted"] and report["leaked"] == 0 and not report["failed"]
    return 0 if ok else 1

"""Load on the HTTP server: ``serve`` with dynamic batching against one request at a time, under concurrent clients.

    python benchmarks/bench_load.py --run RUN [--clients 1 8 32] [--requests 500] [--rerank off on]
        [--batch-size 32] [--batch-wait-ms 5] [--device auto] [--json OUT]

Two servers are started on the run, as subprocesses listening on 127.0.0.1 (``python cli.py serve --run RUN
--port 0 --poll 0``): one with ``--batch-size 1`` (one request at a time: the baseline) and one with
``--batch-size N`` (dynamic batching). Both stay up for the whole benchmark and the cells alternate between
them, so that a machine whose load drifts (other jobs) weighs on both alike. For each rerank setting (the
request's ``rerank`` field) and each number of clients, each server answers ``--requests`` calls of
``POST /recommend`` (``k`` 10) from that many threads of this process, each on its own keep-alive connection.
The users are the run's known users (``GET /users``) in a seeded order, cycled, so concurrent requests are
for different users. Before the first cell of a rerank setting, one request checks that the server can answer
it (a reranker that cannot run gives an error line for its cells, and the benchmark goes on), then
``--warmup`` requests at the largest concurrency warm the server up.

Per cell: errors (an answer that is not 2xx, or a failed connection), requests per second (2xx answers over
the cell's wall time) and the latency percentiles of the 2xx answers as a client sees them. Then the ratios:
batching over one-at-a-time req/s at the same clients and rerank setting, and the p50 difference (batching
minus one-at-a-time, ms; at 1 client it is what batching costs a lone request). ``--json OUT`` writes every
row and ratio. The clients share the machine with the servers, as the servers share it with any other job.
The servers are stopped at the end, also on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r" on (http://\S+) \(Ctrl-C stops\)")  # the line `cli.py serve` prints once it answers
MAX_USERS = 10_000  # GET /users's largest page
STOP = threading.Event()  # set on Ctrl-C / SIGTERM: client threads end after their current request


class BenchError(RuntimeError):
    """The benchmark cannot go on (a server that does not start, a run without users)."""


@dataclass
class Cell:
    """One measured cell (or, with ``error`` and no requests, one that could not run)."""

    mode: str  # one-at-a-time | batching
    batch_size: int
    rerank: str  # off | on
    clients: int
    requests: int = 0  # sent (answered or failed)
    errors: int = 0
    seconds: float = 0.0
    rps: float | None = None  # 2xx answers per second of wall time
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    error: str | None = None  # the first error's message


# -- HTTP ----------------------------------------------------------------------------------------------------
def call(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request on a keep-alive connection (reopened by http.client when it was closed)."""
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
    resp = conn.getresponse()
    return resp.status, resp.read()


def message(status: int, payload: bytes) -> str:
    """An error answer on one line: ``HTTP 409: <the JSON body's error>``."""
    try:
        text = str(json.loads(payload).get("error", ""))
    except (ValueError, AttributeError):
        text = payload.decode("utf-8", "replace")
    return f"HTTP {status}: {' '.join(text.split())[:300]}"


def fetch(url: str, path: str, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    """One request on a fresh connection: GET, or POST with ``body``."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        return call(conn, "GET" if body is None else "POST", path, body)
    finally:
        conn.close()


# -- servers -------------------------------------------------------------------------------------------------
class Server:
    """``python cli.py serve`` in a session of its own (Ctrl-C reaches the benchmark, which stops it); its output
    is drained by a thread, which keeps the last lines for error messages."""

    def __init__(self, mode: str, run: str, batch_size: int, args: argparse.Namespace):
        self.mode, self.batch_size = mode, batch_size
        self.command = [sys.executable, str(REPO / "cli.py"), "serve", "--run", run, "--host", "127.0.0.1",
                        "--port", "0", "--poll", "0", "--device", args.device, "--batch-size", str(batch_size),
                        "--batch-wait-ms", str(args.batch_wait_ms)]
        self.url: str | None = None
        self.tail: deque[str] = deque(maxlen=20)
        self._seen = threading.Event()  # the ready line was printed, or the process ended
        self.proc = subprocess.Popen(self.command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()

    @property
    def label(self) -> str:
        return f"{self.mode} (bs {self.batch_size})"

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())
            found = READY.search(line)
            if found and self.url is None:
                self.url = found.group(1)
                self._seen.set()
        self._seen.set()

    def died(self) -> str | None:
        """None while the process runs; else what it said last."""
        code = self.proc.poll()
        if code is None:
            return None
        last = next((line for line in reversed(self.tail) if line.strip()), "")
        return f"the {self.mode} server exited with code {code}" + (f": {last}" if last else "")

    def wait_ready(self, deadline: float) -> None:
        while not self._seen.wait(0.2):
            if time.monotonic() > deadline:
                raise BenchError(f"the {self.mode} server did not start in time: {' | '.join(self.tail)}")
        if self.url is None:
            raise BenchError(self.died() or f"the {self.mode} server stopped its output")
        # The ready line comes from the app's start-up, just before uvicorn listens: poll /health until it answers.
        while True:
            try:
                status, payload = fetch(self.url, "/health")
                break
            except OSError as err:
                if self.died() or time.monotonic() > deadline:
                    raise BenchError(self.died() or f"the {self.mode} server's /health: {err}") from None
                time.sleep(0.1)
        if status != 200:
            raise BenchError(f"the {self.mode} server's /health: {message(status, payload)}")

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful stop), then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def known_users(url: str, seed: int) -> list:
    """The run's known users (up to 10,000), in a seeded order."""
    status, payload = fetch(url, f"/users?limit={MAX_USERS}")
    if status != 200:
        raise BenchError(f"GET /users: {message(status, payload)}")
    users = [u["user_id"] for u in json.loads(payload)["users"]]
    if not users:
        raise BenchError("the run has no known users to recommend for")
    random.Random(seed).shuffle(users)
    return users


# -- load ----------------------------------------------------------------------------------------------------
def drive(url: str, bodies: list[bytes], clients: int, requests: int, timeout: float
          ) -> tuple[list[float], list[str], float]:
    """``requests`` POST /recommend calls from ``clients`` threads (bodies cycled in order): the 2xx latencies
    (s), the error messages, and the wall time (s) from the start barrier until the last thread ended."""
    parts = urlsplit(url)
    lock = threading.Lock()
    todo = iter(range(requests))
    latencies: list[float] = []
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        mine: list[float] = []
        bad: list[str] = []
        try:
            try:
                conn.connect()  # before the clock starts
            except OSError:
                pass  # the first request reconnects, and counts the failure
            start.wait()
            while not STOP.is_set():
                with lock:
                    i = next(todo, None)
                if i is None:
                    break
                t0 = time.perf_counter()
                try:
                    status, payload = call(conn, "POST", "/recommend", bodies[i % len(bodies)])
                except (OSError, http.client.HTTPException) as err:
                    conn.close()
                    bad.append(f"{type(err).__name__}: {err}")
                    continue
                if 200 <= status < 300:
                    mine.append(time.perf_counter() - t0)
                else:
                    bad.append(message(status, payload))
        except threading.BrokenBarrierError:
            pass
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)
                errors.extend(bad)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
    except BaseException:
        STOP.set()
        start.abort()
        raise
    return latencies, errors, time.perf_counter() - t0


def bodies_for(users: list, rerank: bool, k: int) -> list[bytes]:
    return [json.dumps({"user_id": u, "k": k, "rerank": rerank}).encode() for u in users]


def probe(server: Server, body: bytes, timeout: float) -> str | None:
    """None when the server answers ``body`` with a 2xx (the first rerank call loads the LLM); else why not."""
    dead = server.died()
    if dead:
        return dead
    try:
        status, payload = fetch(server.url, "/recommend", body, timeout)
    except (OSError, http.client.HTTPException) as err:
        return server.died() or f"{type(err).__name__}: {err}"
    return None if 200 <= status < 300 else message(status, payload)


def measure(server: Server, bodies: list[bytes], rerank: str, clients: int, args) -> Cell:
    cell = Cell(server.mode, server.batch_size, rerank, clients)
    dead = server.died()
    if dead:
        cell.error = dead
        return cell
    latencies, errors, seconds = drive(server.url, bodies, clients, args.requests, args.timeout)
    cell.requests, cell.errors, cell.seconds = len(latencies) + len(errors), len(errors), round(seconds, 6)
    cell.error = errors[0] if errors else None
    if latencies:
        ms = sorted(x * 1e3 for x in latencies)
        cell.rps = round(len(latencies) / seconds, 2)
        cell.p50_ms, cell.p95_ms, cell.p99_ms = (round(percentile(ms, q), 3) for q in (50, 95, 99))
    return cell


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# -- report --------------------------------------------------------------------------------------------------
HEADER = (f"{'server':<22}{'rerank':<8}{'clients':>7}{'requests':>10}{'errors':>8}{'req/s':>10}{'p50 ms':>10}"
          f"{'p95 ms':>10}{'p99 ms':>10}")


def row_line(c: Cell, label: str) -> str:
    head = f"{label:<22}{c.rerank:<8}{c.clients:>7}"
    if c.requests == 0:
        return f"{head}  error: {c.error}"
    nums = "".join(f"{'-' if v is None else f'{v:.2f}':>10}" for v in (c.rps, c.p50_ms, c.p95_ms, c.p99_ms))
    line = f"{head}{c.requests:>10}{c.errors:>8}{nums}"
    return line + (f"  first error: {c.error}" if c.error else "")


def ratios(cells: list[Cell]) -> list[dict]:
    """Batching against one-at-a-time at each (rerank, clients) where both measured 2xx answers."""
    by = {(c.mode, c.rerank, c.clients): c for c in cells}
    out = []
    for c in cells:
        base = by.get(("one-at-a-time", c.rerank, c.clients))
        if c.mode != "batching" or base is None or not c.rps or not base.rps:
            continue
        out.append({"rerank": c.rerank, "clients": c.clients, "batching_rps": c.rps, "one_at_a_time_rps": base.rps,
                    "rps_ratio": round(c.rps / base.rps, 3), "p50_diff_ms": round(c.p50_ms - base.p50_ms, 3)})
    return out


def print_ratios(rows: list[dict], batch_size: int) -> None:
    print()
    print(f"{'rerank':<8}{'clients':>7}{'batching req/s':>16}{'one-at-a-time req/s':>21}{'ratio':>8}"
          f"{'p50 diff ms':>13}")
    for r in rows:
        print(f"{r['rerank']:<8}{r['clients']:>7}{r['batching_rps']:>16.2f}{r['one_at_a_time_rps']:>21.2f}"
              f"{r['rps_ratio']:>8.3f}{r['p50_diff_ms']:>+13.2f}")
    print(f"ratio: req/s with batching (--batch-size {batch_size}) / req/s one at a time (--batch-size 1); "
          "p50 diff: batching minus one at a time (at 1 client: what batching costs a lone request)")


# -- main ----------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    servers: list[Server] = []
    try:
        for mode, size in (("one-at-a-time", 1), ("batching", args.batch_size)):
            servers.append(Server(mode, args.run, size, args))
        deadline = time.monotonic() + args.start_timeout
        for s in servers:
            s.wait_ready(deadline)
        users = known_users(servers[0].url, args.seed)
        if len(users) < max(args.clients):
            print(f"note: {len(users)} known users, fewer than {max(args.clients)} clients: some concurrent "
                  "requests are for the same user", flush=True)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"run {args.run}: {len(users)} users, k={args.k}, {args.requests} requests per cell, device "
              f"{args.device}, batch wait {args.batch_wait_ms:g} ms; load average {load:.2f}", flush=True)
        print(HEADER, flush=True)
        cells: list[Cell] = []
        for rerank in args.rerank:
            bodies = bodies_for(users, rerank == "on", args.k)
            unable = {}
            for s in servers:
                unable[s.mode] = probe(s, bodies[0], args.timeout)
                if unable[s.mode] is None and args.warmup:
                    drive(s.url, bodies, max(args.clients), args.warmup, args.timeout)
            for clients in args.clients:
                for s in servers:
                    if unable[s.mode] is not None:
                        cell = Cell(s.mode, s.batch_size, rerank, clients, error=unable[s.mode])
                    else:
                        cell = measure(s, bodies, rerank, clients, args)
                    cells.append(cell)
                    print(row_line(cell, s.label), flush=True)
        compared = ratios(cells)
        print_ratios(compared, args.batch_size)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"load average {load:.2f} at the end", flush=True)
        return {"run": str(args.run), "command": " ".join(["python", *sys.argv]), "users": len(users), "k": args.k,
                "requests": args.requests, "batch_size": args.batch_size, "batch_wait_ms": args.batch_wait_ms,
                "device": args.device, "servers": {s.mode: s.command[1:] for s in servers},
                "rows": [asdict(c) for c in cells], "ratios": compared}
    finally:
        STOP.set()
        for s in servers:
            s.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a trained run with a built index")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per cell")
    p.add_argument("--requests", type=int, default=500, help="requests per cell")
    p.add_argument("--rerank", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="the requests' rerank field (on: the LLM reranks the candidates)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="the batching server's --batch-size (> 1)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="both servers' --batch-wait-ms")
    p.add_argument("--device", default="auto", help="the servers' --device")
    p.add_argument("--warmup", type=int, default=32,
                   help="requests at the largest concurrency before each server's first cell of a rerank setting")
    p.add_argument("--seed", type=int, default=0, help="the order of the users")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take (the first rerank "
                                                                "call loads the LLM)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds the servers may take to start")
    p.add_argument("--json", help="also write every row and ratio here")
    args = p.parse_args()
    if args.batch_size < 2:
        p.error("--batch-size is the batching server's (at least 2); the baseline is always --batch-size 1")
    if min(args.clients) < 1 or args.requests < 1 or args.warmup < 0:
        p.error("--clients and --requests must be positive, --warmup not negative")
    if not Path(args.run).is_dir():
        p.error(f"run directory not found: {args.run}")

    def on_term(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = run(args)
    except BenchError as err:
        print(f"bench_load: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (servers stopped)", file=sys.stderr)
        return 130
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""chatstream side by side with the upstream read directly and with the naive relay.

One command, one workload, one table. Every server is its own process on 127.0.0.1:

- ``upstream``: ``bench/upstream.py`` read directly by the load client, the floor;
- ``naive``: ``bench/naive_relay.py`` (FastAPI ``StreamingResponse`` over ``AsyncOpenAI``),
  without a store, and ``naive+sqlite`` with SQLite sessions;
- ``chatstream``: ``chatstream serve --model openai:bench`` with an in-memory SQLite
  store, and ``chatstream+sqlite`` with a SQLite file;
- ``chatstream+store``: with the store ``--store URL`` names (``postgresql://…``,
  ``redis://…``), and runs shared where ``--runs URL`` says: measured only when given.

Scenarios: one stream of 20,000 tokens sent without delay (tokens/s and server CPU per
token, the median of ``--repeat`` runs), then C concurrent streams of 100 tokens 20 ms
apart for each C in ``--concurrency`` (TTFT, inter-token gaps, failures, server CPU per
token and per turn, server RSS per open stream). The targets are interleaved within
each scenario; each relay runs in a fresh process per scenario, warmed up by a few
short streams. Everything runs on this machine, so the load client and the upstream
share its cores with the server being measured.

Run: ``.venv/bin/python bench/run.py`` (a few minutes), ``--quick`` for a tiny workload
(seconds; what CI runs), ``--json PATH`` to keep the figures, ``--profile DIR`` to sample
each relay with py-spy, ``--store postgresql://…`` (and ``--runs redis://…``) to measure
that store beside SQLite's: the report then says what it costs per turn more than each.
Set ``PYTHONPATH`` to measure another copy of chatstream.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ``python bench/run.py`` as well as ``python -m bench.run``

from bench.load import (  # noqa: E402
    LoadResult,
    Protocol,
    percentile,
    raise_nofile_limit,
    relay,
    run,
    run_load,
    upstream,
)

BENCH = Path(__file__).resolve().parent
HOST = "127.0.0.1"
TARGETS = ("upstream", "naive", "naive+sqlite", "chatstream", "chatstream+sqlite")
# chatstream with the store --store names (and runs where --runs says), when given.
STORE_TARGET = "chatstream+store"
LABELS = {
    "upstream": "upstream direct (floor)",
    "naive": "naive relay",
    "naive+sqlite": "naive relay, SQLite",
    "chatstream": "chatstream, SQLite :memory:",
    "chatstream+sqlite": "chatstream, SQLite file",
    STORE_TARGET: "chatstream, --store",
}


@dataclass(frozen=True, slots=True)
class Backend:
    """The store (and where runs are shared) of the ``chatstream+store`` target."""

    store: str
    runs: str = ""

    @property
    def label(self) -> str:
        kind = {"postgresql": "PostgreSQL", "postgres": "PostgreSQL", "redis": "Redis"}.get(
            self.store.partition(":")[0], self.store.partition(":")[0]
        )
        return f"chatstream, {kind}" + (", runs in Redis" if self.runs else "")


NAN = math.nan


@dataclass(frozen=True, slots=True)
class Scenario:
    """A workload: C streams of N tokens D ms apart, run ``repeat`` times."""

    name: str
    concurrency: int
    tokens: int
    delay_ms: float
    repeat: int = 1
    ramp_s: float = 0.0

    @property
    def paced(self) -> bool:
        return self.delay_ms > 0

    @property
    def timeout_s(self) -> float:
        # A stream still open this long after the start has failed.
        return 30 + self.ramp_s + self.tokens * self.delay_ms / 1000 + self.concurrency / 100


@dataclass(frozen=True, slots=True)
class Server:
    """A target listening on ``port`` in process ``pid``."""

    target: str
    port: int
    pid: int

    def protocol(self, scenario: Scenario) -> Protocol:
        if self.target == "upstream":
            return upstream(scenario.tokens, scenario.delay_ms)
        return relay("/api/chat/stream", scenario.tokens, scenario.delay_ms)


@dataclass(slots=True)
class Row:
    """One line of the table (NaN where a figure does not apply)."""

    scenario: str
    target: str
    concurrency: int
    streams: int
    failures: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    gap_p50_ms: float
    gap_p99_ms: float
    cpu_us_per_token: float
    cpu_ms_per_turn: float
    rss_kib_per_stream: float
    upstream_cpu_us_per_token: float
    client_cpu_us_per_token: float
    errors: list[str]


# -- processes -----------------------------------------------------------------------
# Started and stopped with blocking calls: nothing else runs between two measurements.


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def process(
    command: list[str], *, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, stopped (SIGTERM, then SIGKILL) when the block ends."""
    with log.open("ab") as out:
        child = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=out, cwd=ROOT
        )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if child.stdout is not None:
            child.stdout.close()


def wait_ready(child: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up:\n{log.read_text(errors='replace')[-3000:]}")


@contextmanager
def start_upstream(tmp: Path) -> Iterator[Server]:
    log = tmp / "upstream.log"
    with process([sys.executable, str(BENCH / "upstream.py")], env={}, log=log) as child:
        assert child.stdout is not None
        line = child.stdout.readline().decode()
        if not line.startswith("port "):
            raise RuntimeError(f"the upstream did not start:\n{log.read_text(errors='replace')}")
        yield Server("upstream", int(line.split()[1]), child.pid)


@contextmanager
def start_relay(
    target: str, upstream_port: int, tmp: Path, index: int, backend: Backend | None = None
) -> Iterator[Server]:
    """A relay on a free port, with a fresh store (``backend``'s, a shared one, for
    ``chatstream+store``)."""
    port = free_port()
    env = {"OPENAI_BASE_URL": f"http://{HOST}:{upstream_port}/v1", "OPENAI_API_KEY": "bench"}
    db = tmp / f"{target}-{index}.db"
    if target.startswith("naive"):
        command = [sys.executable, str(BENCH / "naive_relay.py"), "--port", str(port)]
        if target.endswith("+sqlite"):
            command += ["--store", str(db)]
        health = f"http://{HOST}:{port}/health"
    else:
        store = f"sqlite:///{db}" if target.endswith("+sqlite") else "sqlite::memory:"
        if target == STORE_TARGET:
            assert backend is not None, "chatstream+store needs --store"
            store = backend.store
            if backend.runs:
                env["CHATSTREAM_RUNS"] = backend.runs
        # The bench is one caller opening thousands of streams: lift the per-caller limits.
        env.update(
            CHATSTREAM_MAX_STREAMS_PER_KEY="0",
            CHATSTREAM_MAX_STREAMS_TOTAL="0",
            CHATSTREAM_TURNS_PER_MINUTE="0",
        )
        command = [sys.executable, "-m", "chatstream", "serve", "--model", "openai:bench"]
        command += ["--port", str(port), "--store", store]
        health = f"http://{HOST}:{port}/api/health"
    log = tmp / f"{target}-{index}.log"
    with process(command, env=env, log=log) as child:
        wait_ready(child, health, log)
        yield Server(target, port, child.pid)


@contextmanager
def sampled(pid: int, folder: Path | None, name: str) -> Iterator[None]:
    """Sample ``pid`` with py-spy while the block runs (collapsed stacks in ``folder``)."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    command = [str(spy if spy.exists() else "py-spy"), "record", "--pid", str(pid)]
    # --gil: only samples holding the GIL, i.e. CPU spent in Python, not waits for it.
    command += ["--rate", "1000", "--nonblocking", "--gil", "--format", "raw"]
    command += ["--output", str(folder / f"{name}.txt")]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it attach
    try:
        yield
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# -- measuring ----------------------------------------------------------------------


async def measure(server: Server, scenario: Scenario, upstream_pid: int) -> LoadResult:
    return await run_load(
        HOST,
        server.port,
        server.protocol(scenario),
        concurrency=scenario.concurrency,
        expected_tokens=scenario.tokens,
        timeout_s=scenario.timeout_s,
        server_pid=server.pid,
        upstream_pid=None if server.pid == upstream_pid else upstream_pid,
        ramp_s=scenario.ramp_s,
    )


async def warm_up(server: Server) -> None:
    """A few short streams, so imports, pools and caches are not measured."""
    scenario = Scenario("warm-up", 4, 20, 0)
    for _ in range(2):
        await run_load(
            HOST,
            server.port,
            server.protocol(scenario),
            concurrency=scenario.concurrency,
            expected_tokens=scenario.tokens,
            timeout_s=30,
            server_pid=server.pid,
        )


def row(scenario: Scenario, target: str, results: list[LoadResult]) -> Row:
    """The table line for a target: the median run by CPU per token, when repeated."""

    def per_token(cpu_s: float | None, r: LoadResult) -> float:
        return NAN if cpu_s is None else cpu_s / max(r.tokens, 1) * 1e6

    result = sorted(results, key=lambda r: per_token(r.server_cpu_s, r))[len(results) // 2]
    ttfts = [(s.first - s.started) * 1000 for s in result.streams if s.first is not None]
    gaps = [g * 1000 for s in result.streams for g in s.gaps]
    grown = (result.rss_peak - result.rss_before) / 1024 / scenario.concurrency
    return Row(
        scenario=scenario.name,
        target=target,
        concurrency=scenario.concurrency,
        streams=len(result.streams),
        failures=result.failures,
        tokens_per_s=result.tokens / result.wall_s,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        gap_p50_ms=percentile(gaps, 50) if scenario.paced else NAN,
        gap_p99_ms=percentile(gaps, 99) if scenario.paced else NAN,
        cpu_us_per_token=per_token(result.server_cpu_s, result),
        cpu_ms_per_turn=result.server_cpu_s / len(result.streams) * 1000,
        rss_kib_per_stream=grown if scenario.paced else NAN,
        upstream_cpu_us_per_token=per_token(result.upstream_cpu_s, result),
        client_cpu_us_per_token=per_token(result.client_cpu_s, result),
        errors=result.first_errors(),
    )


async def bench(
    scenarios: list[Scenario],
    targets: list[str],
    tmp: Path,
    *,
    fresh: bool,
    profile: Path | None = None,
    backend: Backend | None = None,
) -> list[Row]:
    """Every scenario against every target; ``fresh``: a new relay process per scenario."""
    rows: list[Row] = []
    with ExitStack() as stack:
        up = stack.enter_context(start_upstream(tmp))
        shared: dict[str, Server] = {"upstream": up}
        if not fresh:
            # One process per target for all scenarios (--quick): cheaper, less isolated.
            for target in targets:
                if target != "upstream":
                    shared[target] = stack.enter_context(
                        start_relay(target, up.port, tmp, 0, backend)
                    )
                await warm_up(shared[target])
        for number, scenario in enumerate(scenarios):
            for target in targets:
                with ExitStack() as scope:
                    server = shared.get(target)
                    if server is None:
                        server = scope.enter_context(
                            start_relay(target, up.port, tmp, number, backend)
                        )
                        await warm_up(server)
                    name = f"{target}-{scenario.name}".replace("=", "").replace(",", "")
                    scope.enter_context(sampled(server.pid, profile, name.replace(" ", "-")))
                    results = [
                        await measure(server, scenario, up.pid) for _ in range(scenario.repeat)
                    ]
                rows.append(row(scenario, target, results))
                _progress(rows[-1])
    return rows


def _progress(r: Row) -> None:
    print(
        f"  {r.scenario:<10} {LABELS[r.target]:<28} ok {r.streams - r.failures}/{r.streams}"
        f"  {r.cpu_us_per_token:7.1f} µs/token",
        file=sys.stderr,
        flush=True,
    )


# -- the report ----------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value if round(value, digits) else 0.0:,.{digits}f}"  # no "-0"


HEADER = (
    "| scenario | target | ok | tokens/s | TTFT p50 ms | TTFT p99 ms | gap p50 ms | gap p99 ms"
    " | server CPU µs/token | server CPU ms/turn | RSS KiB/stream |"
)


def table(rows: list[Row]) -> str:
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {LABELS[r.target]} | {r.streams - r.failures}/{r.streams}"
            f" | {_f(r.tokens_per_s, 0)} | {_f(r.ttft_p50_ms)} | {_f(r.ttft_p99_ms)}"
            f" | {_f(r.gap_p50_ms)} | {_f(r.gap_p99_ms)} | {_f(r.cpu_us_per_token)}"
            f" | {_f(r.cpu_ms_per_turn, 2)} | {_f(r.rss_kib_per_stream)} |"
        )
    return "\n".join(lines)


def ratios(rows: list[Row], scenarios: list[Scenario]) -> list[str]:
    """The comparisons that matter, as sentences, then the issue's targets."""
    by = {(r.scenario, r.target): r for r in rows}
    out: list[str] = []
    for scenario in scenarios:
        name = scenario.name
        cs, naive, floor = (by.get((name, t)) for t in ("chatstream", "naive", "upstream"))
        if cs is not None:
            line = f"{name}: chatstream {_f(cs.cpu_us_per_token)} µs CPU/token"
            if naive is not None:
                ratio = naive.cpu_us_per_token / cs.cpu_us_per_token
                line += f", naive relay {_f(naive.cpu_us_per_token)} ({_f(ratio)}x chatstream's)"
            if floor is not None:
                share = cs.tokens_per_s / floor.tokens_per_s * 100
                line += f"; chatstream delivers {_f(share, 0)}% of the floor's tokens/s"
            out.append(line)
        pairs = [("chatstream+sqlite", "chatstream"), ("naive+sqlite", "naive")]
        pairs += [(STORE_TARGET, "chatstream"), (STORE_TARGET, "chatstream+sqlite")]
        for store, base in pairs:
            with_store, without = by.get((name, store)), by.get((name, base))
            # Per turn only means something over many turns, all of them delivered.
            if (
                scenario.concurrency >= 100
                and with_store is not None
                and without is not None
                and with_store.failures + without.failures == 0
            ):
                extra = (with_store.cpu_ms_per_turn - without.cpu_ms_per_turn) * 1000
                more = "more" if extra >= 0 else "less (within the noise)"
                out.append(
                    f"{name}: {LABELS[store]} spends {_f(abs(extra), 0)} µs CPU per turn {more}"
                    f" than {LABELS[base]}"
                )
        helpers = [r for r in rows if r.scenario == name and r.target != "upstream"]
        if helpers:
            up = max(r.upstream_cpu_us_per_token for r in helpers)
            client = max(r.client_cpu_us_per_token for r in rows if r.scenario == name)
            out.append(
                f"{name}: at most {_f(up)} µs CPU/token in the upstream and {_f(client)} in the"
                " load client (they share the cores)"
            )
    return out + targets(by, scenarios)


def targets(by: dict[tuple[str, str], Row], scenarios: list[Scenario]) -> list[str]:
    """The issue's three targets, met or missed."""
    out: list[str] = []
    single = next((s for s in scenarios if s.concurrency == 1), None)
    if single is not None and (cs := by.get((single.name, "chatstream"))):
        ok = cs.cpu_us_per_token <= 40
        out.append(f"target <= 40 µs/token on one stream: {_f(cs.cpu_us_per_token)} {_mark(ok)}")
        if naive := by.get((single.name, "naive")):
            ratio = naive.cpu_us_per_token / cs.cpu_us_per_token
            out.append(f"target >= 3x less CPU/token than naive: {_f(ratio)}x {_mark(ratio >= 3)}")
    thousand = next((s for s in scenarios if s.concurrency == 1000), None)
    if thousand is not None and (cs := by.get((thousand.name, "chatstream"))):
        limit = thousand.delay_ms + 100
        ok = cs.gap_p99_ms <= limit and cs.failures == 0
        out.append(
            f"target C=1000 gap p99 <= {limit:g} ms and no failure: {_f(cs.gap_p99_ms)} ms,"
            f" {cs.failures} failed (TTFT p99 {_f(cs.ttft_p99_ms, 0)} ms) {_mark(ok)}"
        )
    return out


def _mark(ok: bool) -> str:
    return "(met)" if ok else "(MISSED)"


def machine() -> str:
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()},"
        f" load average at start {load}"
    )


def scenarios_for(args: argparse.Namespace) -> list[Scenario]:
    if args.quick:
        return [Scenario("1 stream", 1, 2000, 0), Scenario("C=20", 20, 20, 5)]
    out = [Scenario("1 stream", 1, args.tokens, 0, repeat=args.repeat)]
    out += [
        Scenario(f"C={c:,}", c, args.paced_tokens, args.delay_ms, ramp_s=args.ramp_s)
        for c in args.concurrency
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny workload (CI)")
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens of the single stream")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the single stream")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",") if c],
        default=[100, 1000, 5000],
        help="comma-separated C values (default 100,1000,5000)",
    )
    parser.add_argument("--paced-tokens", type=int, default=100, help="tokens per paced stream")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="pacing of the paced streams")
    parser.add_argument(
        "--ramp-s", type=float, default=0.0, help="start the paced streams evenly over this time"
    )
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--profile", type=Path, help="sample each relay with py-spy into DIR")
    parser.add_argument(
        "--store",
        help="also measure chatstream with this store (postgresql://…, redis://…), beside "
        "SQLite's: the chatstream+store target",
    )
    parser.add_argument("--runs", default="", help="with --store: where runs are shared")
    args = parser.parse_args()
    chosen = [t for t in args.targets.split(",") if t]
    backend = Backend(args.store, args.runs) if args.store else None
    if backend is not None:
        LABELS[STORE_TARGET] = backend.label
        if STORE_TARGET not in chosen:
            chosen.append(STORE_TARGET)
    elif STORE_TARGET in chosen:
        parser.error("the chatstream+store target needs --store URL")
    if unknown := set(chosen) - {*TARGETS, STORE_TARGET}:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    scenarios = scenarios_for(args)
    limit = raise_nofile_limit()  # the servers, started after this, inherit it
    needed = 2 * max(s.concurrency for s in scenarios) + 200
    if limit < needed:
        parser.error(f"the open-file limit is {limit}; these streams need about {needed}")
    started = time.perf_counter()
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="chatstream-bench-") as tmp:
        fresh = not args.quick
        rows = run(
            bench(scenarios, chosen, Path(tmp), fresh=fresh, profile=args.profile, backend=backend)
        )
    print()
    print(table(rows))
    print()
    for line in ratios(rows, scenarios):
        print(line)
    for r in rows:
        if r.errors:
            print(f"{r.scenario}, {LABELS[r.target]}: {r.failures} failed, e.g. {r.errors[0]}")
    print(f"\nbench took {time.perf_counter() - started:.1f} s")
    if args.json:
        args.json.write_text(
            orjson.dumps([asdict(r) for r in rows], option=orjson.OPT_INDENT_2).decode()
        )


if __name__ == "__main__":
    main()

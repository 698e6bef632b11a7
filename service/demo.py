"""The service's console commands: ``steerwatch chat`` and ``steerwatch demo``, and the stream view they share.

``demo`` starts a replica in-process (in-memory store, free ports), then drives it through the public
API only (service/client.py): a vector from contrastive pairs, a threshold calibrated on a plain and a
steered run, a tenant policy with a direction monitor and CAA steering, a short conversation with and
without it, and the alerts that arrived on WatchAlerts.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table
from rich.text import Text

from service.client import SteerwatchClient, add, monitor
from service.protos import chat_pb2
from service.render import HeatView

ALERT_STYLES = {"annotate": "bold yellow", "alert": "bold red", "stop": "bold white on red"}


@dataclass
class Turn:
    """One Generate stream, collected: output text, alert events, peak reading per monitor, the FinalRecord."""

    text: str = ""
    alerts: list[Any] = field(default_factory=list)
    peaks: dict[str, float] = field(default_factory=dict)
    final: Any = None


class StreamView:
    """Prints a Generate stream: tokens (coloured by the first reading when readings are sent), inline alert
    markers, the held-back tail, then a short summary of the FinalRecord."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.heat = HeatView(console, None, bounded=False)

    def show(self, ev: Any) -> None:
        kind = ev.WhichOneof("event")
        if kind == "token":
            readings = dict(ev.token.readings)
            self.heat.monitor = self.heat.monitor or next(iter(readings), None)
            self.heat.token(ev.token.text, readings)
        elif kind == "alert":
            a = ev.alert
            marker = f"[ALERT {a.monitor} {num(a.peak_score)} -> {a.action}]"
            self.console.print(Text(marker, style=ALERT_STYLES.get(a.action, "bold red")), end="", soft_wrap=True)
        elif kind == "final":
            self.console.print(Text(ev.final.tail), soft_wrap=True)
            self.console.print(summary(ev.final), soft_wrap=True)


def num(x: float) -> str:
    """A reading for people: whole numbers from 1000 up, else 4 significant digits."""
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def monitor_text(m: Any) -> str:
    """A MonitorSummary in one line."""
    return (f"{m.monitor} {'FIRED' if m.fired else 'quiet'}, peak {num(m.peak_score)} at token {m.peak_token} "
            f"(threshold {num(m.threshold)}, {m.action})")


def steering_text(s: Any) -> str:
    """An AppliedSteering in one line."""
    what = f"{s.kind} {s.source}" + (f"#{s.feature}" if s.kind == "clamp" else "")
    value = f" {s.value:+g}" if s.kind != "ablate" else ""
    return f"{what}{value} at layers {list(s.layers)} ({s.phase}, from {s.origin})"


def summary(final: Any) -> Text:
    """A few dim lines: finish reason, tokens, policy, timings; monitors; steering applied."""
    finish = str(chat_pb2.FinishReason.Name(final.finish_reason)).removeprefix("FINISH_REASON_").lower()
    policy = f"policy {final.policy} v{final.policy_version}" if final.policy else "no policy"
    t = final.timings
    lines = [f"  [{finish}, {final.usage.completion_tokens} tokens, {policy}, "
             f"ttft {t.ttft_seconds:.2f}s, total {t.total_seconds:.2f}s]"]
    lines += [f"  monitor {monitor_text(m)}" for m in final.monitors]
    lines += [f"  steering {steering_text(s)}" for s in final.steering]
    return Text("\n".join(lines), style="dim")


async def run_turn(client: SteerwatchClient, prompt: Any, view: StreamView | None, **options: Any) -> Turn:
    """Send one Generate, show it on ``view`` (if any), and collect it."""
    turn = Turn()
    async for ev in client.generate(prompt, **options):
        if view is not None:
            view.show(ev)
        kind = ev.WhichOneof("event")
        if kind == "token":
            for name, value in ev.token.readings.items():
                turn.peaks[name] = max(value, turn.peaks.get(name, value))
        elif kind == "alert":
            turn.alerts.append(ev.alert)
        elif kind == "final":
            turn.final, turn.text = ev.final, ev.final.text
    return turn


def rpc_error(console: Console, exc: grpc.aio.AioRpcError) -> None:
    """``error: <CODE>: <details>``."""
    console.print(Text(f"error: {exc.code().name}: {exc.details()}", style="bold red"))


# ---- steerwatch chat ---------------------------------------------------------------------
async def chat(client: SteerwatchClient, prompt: str | None, **options: Any) -> int:
    """One turn (``prompt``), or a loop over stdin lines keeping the conversation as chat messages."""
    out, err = Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False)
    if prompt is not None:
        try:
            await run_turn(client, [("user", prompt)], StreamView(out), **options)
        except grpc.aio.AioRpcError as exc:
            rpc_error(err, exc)
            return 1
        return 0
    history: list[tuple[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            out.print("[bold]you>[/] ", end="")
        # Read on the loop's thread: nothing else runs meanwhile, and Ctrl-C interrupts the read at once.
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        history.append(("user", line.strip()))
        try:
            turn = await run_turn(client, history, StreamView(out), **options)
        except grpc.aio.AioRpcError as exc:
            rpc_error(err, exc)
            history.pop()  # the turn never happened: let the user retry
            continue
        if turn.text.strip():
            history.append(("assistant", turn.text.strip()))


# ---- steerwatch demo ---------------------------------------------------------------------
PAIRS = [("I love talking about weddings.", "I love talking about the weather."),
         ("Weddings are the best topic.", "The weather is the best topic."),
         ("Let me tell you about a wedding.", "Let me tell you about the weather.")]
TURNS = ("Tell me about your weekend.", "What are you planning for next month?")
VECTOR, POLICY, COEF = "weddings", "demo-weddings", 2.0
GEN = {"max_tokens": 24, "stop": ["\nUser:"]}  # greedy; stop before the model writes the user's next turn


async def demo(model: str) -> int:
    """Start a replica in-process on ``model`` and walk through the API; returns the exit code."""
    from service.serve import start_replica
    from service.settings import Settings

    started = time.perf_counter()
    console = Console(highlight=False, soft_wrap=True)
    # the HF engine: it starts in seconds, where vLLM takes about a minute for a two-request demo
    settings = Settings.load(None, host="127.0.0.1", port=0, metrics_port=0, model=model, redis_url=None,
                             engine="hf")
    replica = await start_replica(settings, progress=True)
    try:
        key, _ = await replica.app.store.create_key("demo", "tenant")  # in-process: straight to the store
        console.print(f"server on 127.0.0.1:{replica.port} (in-memory store); API key minted for tenant 'demo'")
        async with SteerwatchClient(f"127.0.0.1:{replica.port}", key, timeout=600) as sw:
            await _walkthrough(sw, console)
    except grpc.aio.AioRpcError as exc:
        rpc_error(Console(stderr=True), exc)
        return 1
    finally:
        await replica.stop(1.0)
    console.print(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
    return 0


async def _walkthrough(sw: SteerwatchClient, console: Console) -> None:
    info = await sw.info()
    layer = 6 if info.n_layers > 6 else info.n_layers // 2
    watch = min(info.n_layers - 1, layer + info.n_layers // 3)  # downstream of the edit (12 on an 18-layer model)
    console.print(f"model {info.model}: {info.n_layers} layers, d_model {info.d_model}\n")
    vec = await sw.create_vector_from_pairs(VECTOR, PAIRS, sorted({layer, watch}), position="mean")
    console.print(f"[bold]1. vector[/] {VECTOR!r} (CreateVectorFromPairs): {len(PAIRS)} pairs, weddings vs weather, "
                  f"position mean, layers {list(vec.layers)}. Steering adds it at layer {layer}; the monitor reads "
                  f"its layer-{watch} direction (a reading at the edited layer is taken before the edit).")
    threshold = await _calibrate(sw, console, layer, watch)
    record = await sw.put_policy(POLICY, _policy(layer, watch, threshold))
    console.print(f"[bold]3. policy[/] {record.name!r} v{record.version}: monitor {VECTOR} (direction, layer {watch}, "
                  f"threshold {num(threshold)}, action alert) + steering add {VECTOR} {COEF:+g} at layer {layer}")
    alerts: list[Any] = []
    watcher = asyncio.create_task(_watch(sw, alerts))
    try:
        console.print("\n[bold]4. a conversation without a policy[/] (the same monitor sent per request, annotate)")
        without = await _conversation(sw, console, monitors=[monitor(VECTOR, "direction", VECTOR, threshold,
                                                                      layer=watch)])
        console.print(f"\n[bold]5. the same conversation under policy {POLICY!r}[/]")
        steered = await _conversation(sw, console, policy=POLICY)
        expected = sum(1 for t in steered for a in t.alerts if a.alert_id)
        await _wait_for(lambda: len(alerts) >= expected, 5.0)
    finally:
        watcher.cancel()
        await asyncio.wait({watcher})
    _recap(console, without, steered, alerts)


async def _calibrate(sw: SteerwatchClient, console: Console, layer: int, watch: int) -> float:
    """Turn 1 plain and steered, with readings of a per-request monitor; a threshold between the two peaks."""
    probe = monitor(VECTOR, "direction", VECTOR, 1e30, layer=watch)  # never fires: only its readings matter
    first = [("user", TURNS[0])]
    runs = [await run_turn(sw, first, None, monitors=[probe], include_readings=True, steering=edits, **GEN)
            for edits in ([], [add(VECTOR, COEF, [layer])])]
    plain, steered = (r.peaks.get(VECTOR, 0.0) for r in runs)
    console.print(f"[bold]2. calibration[/] on turn 1 (include_readings, a per-request monitor): peak projection "
                  f"{num(plain)} plain, {num(steered)} steered ({COEF:+g} x the vector at layer {layer})")
    if steered > plain:
        threshold = (plain + steered) / 2
        console.print(f"   threshold {num(threshold)}, midway: the plain run stays below it, the steered one "
                      "crosses it")
    else:
        threshold = steered - max(1e-3, 0.01 * abs(steered))
        console.print(f"   the steered run does not peak higher here; threshold {num(threshold)}, just under the "
                      "steered peak, so the policy run fires (and the plain run may too)")
    return threshold


def _policy(layer: int, watch: int, threshold: float) -> dict[str, Any]:
    return {"description": "demo: steer toward weddings, and alert when the weddings direction is strong",
            "monitors": [{"name": VECTOR, "kind": "direction", "source": VECTOR, "layer": watch,
                          "threshold": threshold, "action": "alert"}],
            "steering": [{"kind": "add", "vector": VECTOR, "coef": COEF, "layers": [layer]}]}


async def _conversation(sw: SteerwatchClient, console: Console, **options: Any) -> list[Turn]:
    history: list[tuple[str, str]] = []
    turns = []
    for text in TURNS:
        history.append(("user", text))
        console.print(f"[bold]user>[/] {text}\n[bold]assistant>[/] ", end="")
        turns.append(await run_turn(sw, history, StreamView(console), **options, **GEN))
        history.append(("assistant", turns[-1].text.strip() or "..."))
    return turns


async def _watch(sw: SteerwatchClient, out: list[Any]) -> None:
    async for alert in sw.watch_alerts(after_id="0"):  # "0": replay from the oldest, so none is missed
        out.append(alert)


async def _wait_for(done: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _recap(console: Console, without: list[Turn], steered: list[Turn], alerts: list[Any]) -> None:
    table = Table(title="6. recap", show_lines=True)
    for col in ("turn", "without policy", f"with policy {POLICY!r}"):
        table.add_column(col)
    for i, (a, b) in enumerate(zip(without, steered, strict=True)):
        table.add_row(str(i + 1), a.text.strip(), b.text.strip())
        table.add_row("", _fired(a), _fired(b))
    console.print(table)
    console.print(f"alerts received on WatchAlerts: {len(alerts)}")
    for a in alerts:
        console.print(f"  {a.alert_id} {a.monitor} {a.action}: peak {num(a.peak_score)} > {num(a.threshold)} at tokens "
                      f"{a.token_start}..{a.token_end}, policy {a.policy!r}, excerpt {a.excerpt[-40:]!r}")
    applied = sorted({steering_text(s) for t in steered if t.final for s in t.final.steering})
    console.print("steering applied under the policy: " + ("; ".join(applied) or "none"))


def _fired(t: Turn) -> str:
    return "\n".join(monitor_text(m) for m in t.final.monitors) if t.final else "(no final record)"

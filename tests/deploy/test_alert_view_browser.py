"""The live alerts page in headless Chromium (Debian's chromium + chromium-driver) against a running
replica on Redis: it shows the tenant's alerts with excerpt and token span, picks up new ones without a
reload, renders hostile excerpts as text, and reports a bad key.

``scripts/test.sh`` installs Chromium when it is missing; run directly without it, the test skips.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.service.grpc_harness import direction_monitor, policy_doc, random_vector, rig, run

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (scripts/test.sh installs them)")
webdriver = pytest.importorskip("selenium.webdriver")

FIRES = -1e9
HOSTILE = '<img src=x onerror="window.__pwned=1"><b>bold</b> & "quotes"'


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium that never reaches beyond loopback (the flags keep its background traffic off)."""
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--disable-extensions", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rows(driver: Any) -> list[dict[str, str]]:
    """The table's rows as {column class: text}, newest first, plus the alert id."""
    return driver.execute_script("""
        return Array.from(document.querySelectorAll('#alerts tbody tr')).map(tr => {
            const out = {id: tr.dataset.alertId};
            for (const td of tr.cells) out[td.className] = td.textContent;
            return out;
        });""")


def connect(driver: Any, url: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    driver.find_element(By.ID, "key").clear()
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "watch").click()


def test_live_alert_page_in_headless_chromium() -> None:
    async def body() -> None:
        async with rig("redis") as r:
            url = f"http://127.0.0.1:{r.replica.metrics_port}/alerts/"
            acme, other = r.client, await r.tenant_client("globex")
            for c in (acme, other):
                await c.upload_vector("v", {1: random_vector(0)})
                await c.put_policy("p", policy_doc([direction_monitor("mon", "v", FIRES)]), make_default=True)
            first = (await acme.generate("abc", 4)).alerts[0]
            await other.generate("abc", 2)  # another tenant's: must never show
            # model output can be anything: an excerpt carrying markup must stay text
            hostile_id = await r.store.add_alert("acme", {
                "monitor": "mon", "action": "stop", "excerpt": HOSTILE, "token_start": "7", "token_end": "9",
                "timestamp_ms": str(int(time.time() * 1000)), "request_id": "r-hostile", "policy": "p",
                "peak_score": "inf", "threshold": "0.5", "phase": "generation"})

            with chromium() as driver:
                await asyncio.to_thread(connect, driver, url, acme.key)
                shown = await asyncio.to_thread(wait_for, lambda: len(rows(driver)) == 2 and rows(driver),
                                                "the two acme alerts")
                assert [row["id"] for row in shown] == [hostile_id, first.alert_id]  # newest on top
                newest, oldest = shown
                assert oldest["monitor"] == "mon" and oldest["action"] == "alert"
                assert oldest["excerpt"] == first.excerpt and oldest["request"] == first.request_id
                assert oldest["span"] == f"{first.token_start}–{first.token_end}"
                assert newest["excerpt"] == HOSTILE and newest["span"] == "7–9"
                assert newest["score"] == "– / 0.500"  # a non-finite score arrives as null
                assert driver.execute_script(
                    "return document.querySelectorAll('#alerts tbody img, #alerts tbody b').length") == 0
                assert driver.execute_script("return window.__pwned === undefined")
                status = driver.execute_script("return document.getElementById('status').textContent")
                assert status.startswith("Live · tenant acme")

                # live: a new generation's alert appears on top without a reload
                second = (await acme.generate("xyz", 3)).alerts[0]
                live = await asyncio.to_thread(wait_for, lambda: len(rows(driver)) == 3 and rows(driver),
                                               "the new alert to appear live")
                assert live[0]["id"] == second.alert_id and live[0]["excerpt"] == second.excerpt
                assert live[0]["span"] == f"{second.token_start}–{second.token_end}"
                assert "fresh" in driver.execute_script(
                    "return document.querySelector('#alerts tbody tr').className")

                # a wrong key says so on the page and shows nothing
                await asyncio.to_thread(connect, driver, url, "sw_wrong_key")
                await asyncio.to_thread(wait_for, lambda: "Error 401" in driver.execute_script(
                    "return document.getElementById('status').textContent"), "the 401 message")
                assert rows(driver) == []
                logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
                assert logs == [], logs  # no script errors, no CSP violations

    run(body(), timeout=120)

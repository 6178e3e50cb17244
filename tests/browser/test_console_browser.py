"""The console in a real headless Chromium, over a real daemon and the real console process:
an operator logs in, approves what a worker waits for and sees it run, halts the host and
resumes it, reads a simulated month's trends, and does all of it at a phone's width."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from supervisor.console.charts import rate_changes
from supervisor.store import console as store_reads
from supervisor.store import open_store
from supervisor.timing.clock import SystemClock
from tests.acceptance.workers_fixture import refund_workers
from tests.browser.conftest import (
    DESKTOP,
    PHONE,
    Console,
    Daemon,
    add_operator,
    login,
    output_dir,
    start_console,
)

pytestmark = [pytest.mark.browser, pytest.mark.acceptance, pytest.mark.anyio]

REFUNDER = refund_workers(1)


async def no_horizontal_scroll(page: Any) -> None:
    width = await page.evaluate("document.documentElement.scrollWidth")
    viewport = await page.evaluate("window.innerWidth")
    assert width <= viewport, f"{page.url}: content {width}px wide in a {viewport}px viewport"


async def test_approve_in_the_browser_and_the_worker_acts(
    daemon: Any, browser: Any, consoles: list[Console]
) -> None:
    d: Daemon = daemon(workers=REFUNDER)

    async def pending() -> list[Any]:
        return [r for r in await d.approvals() if r["status"] == "pending"]

    [row] = await d.wait_until(pending, what="the refund's pending approval")
    secret = await add_operator(d, "alice", "approver")
    console = await start_console(d)
    consoles.append(console)

    page = await browser.new_page(viewport=DESKTOP)
    await login(page, console, "alice", secret)
    assert await page.inner_text("#pending-count") == "1"
    await page.click("text=Approvals")
    card = page.locator(f"#approval-{row['id']}")
    assert "support.refund" in await card.inner_text()
    assert "refunder" in await card.inner_text()
    await page.screenshot(path=str(output_dir() / "approvals-desktop.png"), full_page=True)
    assert d.effects() == []  # nothing ran while it waited

    await card.locator("button", has_text="Approve once").click()
    await page.wait_for_selector(".flash.ok")
    assert "approved (once) by alice" in await page.inner_text(".flash.ok")

    effects = await d.wait_until(d.effects, what="the approved refund's effect")
    assert [(e["worker"], e["approval"]) for e in effects] == [("refunder", row["id"])]
    [decided] = [r for r in await d.approvals() if r["id"] == row["id"]]
    assert (decided["status"], decided["decided_by"]) == ("approved", "alice")
    [granted] = await d.events("APPROVAL_GRANTED")
    assert granted.payload["by"] == "alice"
    await page.reload()
    assert "alice" in await page.inner_text("#history")
    assert await d.stop() == 0


async def test_halt_the_host_then_resume_from_the_browser(
    daemon: Any, browser: Any, consoles: list[Console]
) -> None:
    d: Daemon = daemon()
    await d.running()
    secret = await add_operator(d, "root-oncall", "admin")
    console = await start_console(d)
    consoles.append(console)

    # At a phone's width, and without JavaScript: every page is plain HTML forms.
    context = await browser.new_context(viewport=PHONE, java_script_enabled=False)
    page = await context.new_page()
    await login(page, console, "root-oncall", secret)
    await page.goto(console.url + "/killswitch")
    form = page.locator("#switch-form")
    await form.locator("select[name=scope]").select_option("host")
    await form.locator("select[name=mode]").select_option("halt_all")
    await form.locator("input[name=reason]").fill("incident 3am")
    await form.locator("button[type=submit]").click()
    await page.wait_for_selector(".flash.ok")
    engaged_at = datetime.now(UTC)
    assert "kill switch host: halt_all (by root-oncall)" in await page.inner_text(".flash.ok")
    assert "halt_all" in await page.inner_text("#switches")
    await page.screenshot(path=str(output_dir() / "killswitch-phone.png"), full_page=True)
    await no_horizontal_scroll(page)

    await d.wait_until(d.refused_after(engaged_at, "killswitch", workers=3),
                       what="kill-switch refusals from all three workers")  # fmt: skip
    await anyio.sleep(0.6)  # a window in which nothing may start (a negative check)
    await d.nothing_started_after(engaged_at)
    [engaged] = await d.events("KILLSWITCH_ENGAGED")
    assert (engaged.payload["by"], engaged.payload["reason"]) == ("root-oncall", "incident 3am")
    await page.goto(console.url + "/")
    assert await page.inner_text("#host-mode") == "halt_all"

    await page.goto(console.url + "/killswitch")
    form = page.locator("#switch-form")
    await form.locator("select[name=scope]").select_option("host")
    await form.locator("select[name=mode]").select_option("disengaged")
    await form.locator("input[name=reason]").fill("resolved")
    await form.locator("button[type=submit]").click()
    await page.wait_for_selector(".flash.ok")
    resumed_at = datetime.now(UTC)
    await d.wait_until(d.started_after(resumed_at, 3), what="actions to resume")
    [off] = await d.events("KILLSWITCH_DISENGAGED")
    assert off.payload["by"] == "root-oncall"
    assert "KILLSWITCH_DISENGAGED" in await page.inner_text("#ks-history")
    assert await d.stop() == 0


MONTH_WORKERS = """
[[workers]]
name = "support"
class = "workers.support:SupportAgent"
replicas = 2
"""


async def test_trends_of_a_simulated_month(
    daemon: Any, browser: Any, consoles: list[Console]
) -> None:
    d: Daemon = daemon(workers=MONTH_WORKERS, start=False)
    sim_db = f"sqlite:///{d.state_dir / 'month.db'}"  # a simulated run of its own, named
    await d.cli_ok("--db", sim_db, "run", "--horizon", "month", "--simulate", "--start",
                   "2026-10-01T00:00:00Z", "--seed", "5")  # fmt: skip
    store = await open_store(sim_db, SystemClock())
    try:
        windows = await store_reads.windows(store, "acceptance")
    finally:
        await store.close()
    assert len(windows) >= 30
    denials = [w["counts"]["denials"] for w in windows]
    assert sum(denials) > 0  # the support agents' high-risk cases are denied by policy
    secret = await add_operator(d, "viewer-1", "viewer")
    console = await start_console(d, "--db", sim_db)
    consoles.append(console)

    page = await browser.new_page(viewport=DESKTOP)
    await login(page, console, "viewer-1", secret)
    await page.goto(console.url + "/windows")
    charts = page.locator("figure.chart-card")
    assert await charts.count() >= 7
    points = page.locator("figure[data-series=denials] svg circle.point")
    assert await points.count() == len(windows)  # one point per window
    rows = page.locator("#windows tr")
    assert await rows.count() == len(windows) + 1
    # the rate changes of the series are marked, one triangle each, as computed from the store
    marks = page.locator("figure[data-series=denials] svg polygon")
    assert await marks.count() == len(rate_changes(denials)) > 0
    box = await page.locator("figure[data-series=denials] svg").bounding_box()
    assert box is not None and box["width"] > 200 and box["height"] > 50
    await page.screenshot(path=str(output_dir() / "trends-month.png"), full_page=True)

    phone = await browser.new_page(viewport=PHONE)
    await login(phone, console, "viewer-1", secret)
    for path in ("/", "/approvals", "/killswitch", "/windows", "/events", "/repair"):
        await phone.goto(console.url + path)
        assert await phone.locator("h1").count() == 1
        await no_horizontal_scroll(phone)
    await phone.goto(console.url + "/windows")
    await phone.screenshot(path=str(output_dir() / "trends-phone.png"), full_page=True)

"""The Prefect UI in headless Chromium: the finished pretrain run's page shows the cleaning funnel artifact.

Debian's `chromium` (/usr/bin/chromium) driven by Playwright's Python package; `playwright install`
is never needed. Every request that does not go to the loopback server is blocked (the UI calls an
analytics host even with analytics off). Screenshots are saved under the test's tmp dir.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false pytest tests/deployments/test_browser.py -s
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
TIMEOUT_MS = 90_000  # the first page load compiles nothing, but the machine is loaded


def browser_or_skip():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is missing (pip install playwright; no `playwright install` needed)")
    return sync_playwright


def test_finished_pretrain_run_page_shows_the_funnel_table(chain, served_stack, helpers, tmp_path):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.objects import StateType

    sync_playwright = browser_or_skip()
    run = chain["pretrain"]
    assert run.state_type == StateType.COMPLETED, served_stack.log_tail()
    with helpers.client_for(served_stack.api_url) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["pretrain-cleaning-funnel"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    funnel = {row["step"]: row["count"] for row in rows}
    assert {"input", "near_duplicate", "output"} <= set(funnel)

    blocked: list[str] = []

    def only_loopback(route):
        if urlparse(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.route("**/*", only_loopback)

            # The run page, as linked from the run logs. The UI opens it on the Logs tab (it rewrites
            # ?tab=...), so the Artifacts tab is clicked like a person would.
            page.goto(f"{served_stack.ui_url}/runs/flow-run/{run.id}")
            page.get_by_text(f"Beginning flow run '{run.name}'").first.wait_for()
            page.get_by_text("Artifacts", exact=True).first.click()
            card = page.get_by_text("pretrain-cleaning-funnel", exact=True).first
            card.wait_for()
            page.get_by_text(artifact.description).first.wait_for()
            run_shot = tmp_path / "pretrain-run-artifacts.png"
            page.screenshot(path=str(run_shot), full_page=True)

            # Its card opens the artifact, rendered as a table with the funnel's rows.
            card.click()
            page.wait_for_url(f"**/artifacts/artifact/{artifact.id}**")
            page.get_by_text("near_duplicate").first.wait_for()
            table = page.locator("table").first
            for step, count in funnel.items():  # every funnel row, with its count in the same row
                cells = table.locator("tr", has=page.get_by_text(step, exact=True)).first.locator("td").all_inner_texts()
                assert [c.strip() for c in cells] == [step, str(count)], (step, cells)
            table_shot = tmp_path / "pretrain-cleaning-funnel.png"
            page.screenshot(path=str(table_shot), full_page=True)
        finally:
            browser.close()
    print(f"screenshots: {run_shot} {table_shot}; blocked non-loopback requests: {len(blocked)}")
    assert run_shot.stat().st_size > 10_000 and table_shot.stat().st_size > 10_000

"""A person labels a batch by keyboard in a real browser (Debian's Chromium driven by Playwright),
and the paused cascade run resumes through the Prefect API and finishes its iteration."""

from __future__ import annotations

import os
import re
import threading

import httpx
import pytest
from prefect import get_client

from flows.runner import resume_waiting_run, run_cascade
from lsun_hitl.config import CascadeParams, ModelParams
from lsun_hitl.crowd import truth_by_image_id
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool
from lsun_hitl.labelers import create_labeler
from lsun_hitl.labels import list_requests, read_votes
from lsun_hitl.manifest import manifest_iterations
from lsun_hitl.quality import QCParams
from lsun_hitl.service import ServiceThread, create_app
from lsun_hitl.storage import Storage

CHROMIUM = "/usr/bin/chromium"
CATEGORY = "bag"
PARAMS = CascadeParams(
    train_sample=20,
    calibration_sample=50,
    first_calibration_sample=50,
    target_false_omission=0.2,
    confidence=0.5,
    max_iterations=1,
    allow_small_pool=True,
    stop_unlabeled=0,
    remainder="unresolved",
    recheck=False,  # one person answers everything once: this test is about the page
    label_poll_s=1,
    label_timeout_s=600,
    score_partition=200,
    model=ModelParams(image_size=32, epochs=1, batch_size=32),
)
ONE_PERSON = QCParams(labels_per_image=1, min_margin=1, gold_rate=0.0, batch_size=35)


def test_keyboard_labeling_resumes_the_waiting_run(tmp_path, dask_cluster, prefect_harness):
    from playwright.sync_api import expect, sync_playwright

    assert os.path.exists(CHROMIUM), "install Debian's chromium (scripts/setup.sh does)"
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=400, seed=3), client=dask_cluster)
    truth = truth_by_image_id(storage, CATEGORY)
    token = create_labeler(storage, "ann")

    result: dict = {}
    flow = threading.Thread(
        target=lambda: result.update(summary=run_cascade(CATEGORY, storage.url, params=PARAMS)), daemon=True
    )
    flow.start()
    app = create_app(storage, ONE_PERSON, on_complete=resume_waiting_run(storage), preload=3)
    with ServiceThread(app) as url, sync_playwright() as pw:
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        blocked: list[str] = []  # what the page's Content-Security-Policy refused: nothing of the page's own
        page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(f"{url}/#token={token}")
        expect(page.locator("#who")).to_have_text("ann")
        answered = 0
        for _ in range(2):  # 70 images in batches of 35
            # a locator, not wait_for_function: the page's Content-Security-Policy forbids evaluating strings
            expect(page.locator("#count")).to_contain_text(re.compile(r"^0 /"), timeout=120_000)
            batch = api.post("/api/batches/next").json()["batch"]
            expect(page.locator("#question")).to_have_text(f"Is this a {CATEGORY}?")
            n = len(batch["items"])
            for item in batch["items"]:
                i = item["index"]
                expect(page.locator("#count")).to_have_text(f"{i} / {n} in this batch")
                expect(page.locator("#image")).to_have_attribute("data-index", str(i))
                assert page.locator("#image").get_attribute("src").startswith("blob:")
                if i == 3:  # a slip of the finger, then undo
                    page.keyboard.press("n" if truth[item["image_id"]] else "y")
                    expect(page.locator("#count")).to_have_text(f"4 / {n} in this batch")
                    page.keyboard.press("Backspace")
                    expect(page.locator("#count")).to_have_text(f"3 / {n} in this batch")
                if answered == 10 and os.environ.get("LSUN_HITL_SCREENSHOT"):
                    page.screenshot(path=os.environ["LSUN_HITL_SCREENSHOT"])
                page.keyboard.press("y" if truth[item["image_id"]] else "n")
                answered += 1
        expect(page.locator("#status")).to_contain_text("Nothing to label", timeout=60_000)
        browser.close()
        assert blocked == [], blocked
        flow.join(300)
    assert not flow.is_alive(), "the flow run did not finish after the labels arrived"

    votes = read_votes(storage, CATEGORY).to_pandas()
    assert len(votes) == answered == 70 and set(votes["labeler"]) == {"ann"}
    assert all((a == "yes") == truth[i] for i, a in zip(votes["image_id"], votes["answer"], strict=True))
    (request,) = list_requests(storage, CATEGORY)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(request.flow_run_id)
        states = client.read_flow_run_states(request.flow_run_id)
    assert run.state.is_completed() and sum(s.is_paused() for s in states) == 1
    assert manifest_iterations(storage, CATEGORY) == [0, 1]
    assert result["summary"]["human_labeled_images"] == 70


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")

"""The Dask dashboard during a build, in headless Chromium, as a user would see it."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

import hepdask
from hepdask.config import from_dict

from .data_generation import SlowReads, demo_config

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver")
def test_dashboard_shows_the_build_live(ldmx_data, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from distributed import Client, LocalCluster

    data, _ = ldmx_data
    config = from_dict(demo_config(data, tmp_path / "d.zarr"))
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(SlowReads(3.0))  # 8 files on 2 workers: ~12 s of reading
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        build = threading.Thread(target=hepdask.build_dataset, args=(config,),
                                 kwargs={"client": client, "progress": False})
        build.start()
        deadline = time.monotonic() + 60
        while not any(client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.05)

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chromium'}"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
        try:
            browser.get(link)
            time.sleep(4)  # Bokeh draws after the page loads
            in_progress = {k: len(v) for k, v in client.processing().items() if v}
            screenshot = Path(tmp_path / "dashboard.png")
            browser.save_screenshot(str(screenshot))
            title = browser.title
        finally:
            browser.quit()
        build.join()
    assert "Dask" in title
    assert in_progress, "the screenshot was taken when no task was running"
    assert screenshot.stat().st_size > 20_000
    print(f"dashboard screenshot: {screenshot} (tasks running: {in_progress})")

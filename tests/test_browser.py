"""Open the chart gallery and an evaluation report in real headless Chromium: every image must load.

Uses Debian's ``chromium`` and ``chromium-driver`` (installed by ``.ci/run``) through Selenium; no
browser is downloaded. Skipped where Chromium is absent, failed instead when ``CI=true``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from modules import config

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: For every <img>: its src, whether loading finished, its decoded width (0 = broken) and its width on the page.
IMAGES_SCRIPT = ("return Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete, "
                 "width: i.naturalWidth, shown: i.getBoundingClientRect().width}));")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        reason = "Debian chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--allow-file-access-from-files",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def page_images(driver, page: Path) -> list[dict]:
    """Load a local page and return its images' load state, after the page finished loading."""
    driver.get(page.resolve().as_uri())
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "if (document.readyState === 'complete') { done(); } else { window.addEventListener('load', () => done()); }")
    return driver.execute_script(IMAGES_SCRIPT)


def broken(images: list[dict]) -> list[str]:
    return [image["src"] for image in images if not image["complete"] or image["width"] == 0]


def test_broken_image_is_detected(browser, tmp_path):
    # The check itself must be able to fail: a page with one missing image.
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    page = tmp_path / "page.html"
    page.write_text("<html><body><img src='ok.png'><img src='missing.png'></body></html>")
    images = page_images(browser, page)
    assert len(images) == 2 and broken(images) == ["missing.png"]


def test_viz_index_images_load(browser, notebook_series):
    output_dir, _ = notebook_series
    index = output_dir / config.VIZ_SUBDIR / "index.html"
    browser.set_window_size(1400, 1000)
    images = page_images(browser, index)
    published = sorted((output_dir / config.VIZ_SUBDIR).glob("*/*.png"))
    assert len(images) == len(published) >= 20
    assert not broken(images), f"images that did not load in {index}: {broken(images)}"
    # Wide charts stay readable: each thumbnail fills a column of at least 500 px (click for full size).
    assert min(image["shown"] for image in images) >= 500
    page = browser.page_source
    assert "SYNTHETIC cells or models" in page  # the page-level banner
    assert "1.EDA — the cells of the data set" in page and "Evaluation of run" in page


def test_evaluation_report_images_load(browser, notebook_series):
    output_dir, _ = notebook_series
    reports = sorted((output_dir / config.EVALUATIONS_SUBDIR).glob("*/report.html"))
    assert reports, "the notebook run wrote no evaluation report.html"
    images = page_images(browser, reports[0])
    assert len(images) >= 8
    assert not broken(images), f"images that did not load in {reports[0]}: {broken(images)}"
    assert "SYNTHETIC" in browser.page_source.upper()

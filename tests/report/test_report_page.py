"""The report page opened from disk in a real headless browser (Debian's chromium, Playwright).

(The README's picture, docs/report.png, is made the same way by bench/report_example.py.)
"""

import shutil

import pytest
from PIL import Image, ImageStat

from lmscale.report import report

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium is not installed")
def test_page_opens_from_disk_with_every_plot_loaded(report_runs, tmp_path):
    from playwright.sync_api import sync_playwright

    result = report(report_runs, tmp_path / "out")
    shot = tmp_path / "screenshot.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(result.page.resolve().as_uri())
        page.wait_for_function("[...document.images].every(img => img.complete)")
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(img => img.naturalWidth)")
        rows = page.locator("table tr").count()
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert len(widths) == len(result.pngs) and all(w > 0 for w in widths), widths
    assert rows == 1 + len(report_runs)  # the header, and one row per run
    with Image.open(shot) as image:
        assert image.width >= 1400 and image.height > 900  # the whole page, not the viewport
        assert max(ImageStat.Stat(image.convert("RGB")).var) > 0
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or range(2)) > 10

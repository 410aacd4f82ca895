"""The chat page in a real headless browser (Debian's chromium, driven by Playwright)."""

import shutil

import pytest

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium is not installed")
def test_page_streams_a_reply_and_keeps_the_conversation(smollm2_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(smollm2_server + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('smollm2')")
        page.fill("#temperature", "0")  # greedy: the answer is known
        for question in ("What is the capital of France?", "And of Italy?"):
            page.fill("#prompt", question)
            page.click("#send")
            page.wait_for_function(
                "[...document.querySelectorAll('.assistant')].length > 0 && "
                "[...document.querySelectorAll('.assistant')].every(b => b.dataset.done === 'true')",
                timeout=60_000,
            )
        replies = page.locator(".assistant").all_inner_texts()
        users = page.locator(".user").all_inner_texts()
        browser.close()
    assert users == ["What is the capital of France?", "And of Italy?"]
    assert len(replies) == 2 and "Paris" in replies[0] and replies[1].strip()

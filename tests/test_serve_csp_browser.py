"""The Content-Security-Policy in a real Chromium: the page's own inline script runs (its hash is admitted), and
script that reaches the page as markup (an injected <script>, an `onerror=` handler) does not.

Skipped, with the reason, only where no Chromium binary or no Playwright is installed (.ci/run installs both).
"""

from __future__ import annotations

import os
import shutil

import pytest

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
CHROMIUM = os.environ.get("ASTROLOM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,  # drives a real browser
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install -y chromium)"),
]

# recorded from before the page's own script runs (an init script is not subject to the page's policy)
WATCH = """window.__violations = [];
document.addEventListener('securitypolicyviolation',
  e => window.__violations.push(e.effectiveDirective + ' ' + (e.blockedURI || '')));"""

INJECT = """() => {
  const s = document.createElement('script');
  s.textContent = 'window.__pwned_script = 1';
  document.body.appendChild(s);
  const d = document.createElement('div');
  d.innerHTML = '<img src="x-missing.png" onerror="window.__pwned_onerror = 1">';
  document.body.appendChild(d);
}"""


def test_page_script_runs_and_injected_script_does_not(mock_survey, tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    from search_helpers import make_model_index, serving

    idx = make_model_index(mock_survey, tmp_path_factory.mktemp("csp_browser"))
    with serving(idx) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.add_init_script(WATCH)
            with page.expect_request("**/api/info", timeout=30_000):  # only the page's own script asks for it
                page.goto(url + "/")
            page.wait_for_load_state("networkidle", timeout=30_000)
            own = page.evaluate("() => window.__violations")
            assert not [v for v in own if v.startswith("script-src")], own
            page.evaluate(INJECT)
            page.wait_for_function(
                "() => window.__violations.filter(v => v.startsWith('script-src')).length >= 2", timeout=10_000
            )
            assert page.evaluate("() => [window.__pwned_script, window.__pwned_onerror]") == [None, None]
            blocked = page.evaluate("() => window.__violations")
            assert any(v.startswith("script-src-elem inline") for v in blocked), blocked
            assert any(v.startswith("script-src-attr inline") for v in blocked), blocked
        finally:
            browser.close()

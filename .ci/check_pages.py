"""Open pages of the built docs site in headless Chromium and fail on what a reader would see.

    python .ci/check_pages.py docs/_build/html [--screenshots DIR] [PAGE.html ...]

For each page (default: the landing page, the statistic guide, the BasicSR guide and the API
reference) a copy with a small script appended is loaded at a 1280 x 2000 window; after the
page's own scripts (MathJax included) have run, the script writes its findings into the DOM,
which ``chromium --dump-dom`` prints. A page fails when

- it does not load (no findings in the dumped DOM, or a title that is not the site's);
- the document is wider than the window (the page scrolls sideways);
- a code block, table or formula is wider than its box (it scrolls sideways);
- an image did not load;
- a formula was left as TeX source (MathJax did not render it).

``--screenshots DIR`` also saves a PNG of each page there (outside the repository: look at
them, never commit them). Needs ``chromium`` (Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PAGES = ("index.html", "guides/statistic.html", "guides/basicsr.html", "api.html")
WIDTH, HEIGHT = 1280, 2000

CHECK = """
<script>
window.addEventListener("load", () => setTimeout(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const root = document.documentElement;
  const overflowing = [];
  for (const el of document.querySelectorAll("pre, table, .math, mjx-container, img")) {
    if (el.closest(".sidebar-drawer, .toc-drawer")) continue;
    if (el.scrollWidth > el.clientWidth + 1 && el.clientWidth > 0) {
      overflowing.push(`${el.tagName.toLowerCase()} ${el.scrollWidth} > ${el.clientWidth}: `
        + (el.textContent || el.getAttribute("src") || "").trim().slice(0, 80));
    }
  }
  const findings = {
    title: document.title,
    scrollWidth: root.scrollWidth,
    innerWidth: window.innerWidth,
    overflowing: overflowing,
    brokenImages: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
    texLeft: [...document.querySelectorAll(".math")].filter(m => !m.querySelector("mjx-container")).length,
    formulas: document.querySelectorAll("mjx-container").length,
  };
  const out = document.createElement("pre");
  out.id = "page-check";
  out.textContent = JSON.stringify(findings);
  document.body.appendChild(out);
}, 500));
</script>
"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("check_pages: no chromium on PATH (Debian: apt-get install -y chromium)")


def run_chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


def check(browser: str, site: Path, page: str, screenshots: Path | None) -> list[str]:
    """The problems of one page, as sentences (empty: the page is fine)."""
    source = site / page
    if not source.is_file():
        return [f"{page}: no such page in {site}"]
    html = source.read_text(encoding="utf-8")
    if "</body>" not in html:
        return [f"{page}: no </body>: not a complete HTML page"]
    with tempfile.NamedTemporaryFile("w", suffix=".html", dir=source.parent, delete=False, encoding="utf-8") as copy:
        copy.write(html.replace("</body>", CHECK + "</body>", 1))
    try:
        url = Path(copy.name).resolve().as_uri()
        dumped = run_chromium(browser, "--virtual-time-budget=15000", "--dump-dom", url).stdout
        if screenshots is not None:
            screenshots.mkdir(parents=True, exist_ok=True)
            shot = screenshots / (page.replace("/", "_").removesuffix(".html") + ".png")
            run_chromium(browser, "--virtual-time-budget=15000", f"--screenshot={shot}", url)
    finally:
        Path(copy.name).unlink()
    match = re.search(r'<pre id="page-check">(.*?)</pre>', dumped, re.S)
    if match is None:
        return [f"{page}: did not load in Chromium (no findings in the dumped page; {len(dumped)} bytes)"]
    found = json.loads(match.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    problems = []
    if "d2sm-loss" not in found["title"]:
        problems.append(f"{page}: title {found['title']!r} is not the site's")
    if found["scrollWidth"] > found["innerWidth"]:
        problems.append(f"{page}: the page is {found['scrollWidth']} px wide in a {found['innerWidth']} px window")
    problems += [f"{page}: scrolls sideways: {what}" for what in found["overflowing"]]
    problems += [f"{page}: image did not load: {src}" for src in found["brokenImages"]]
    if found["texLeft"]:
        problems.append(f"{page}: {found['texLeft']} formulas left as TeX source (MathJax did not run)")
    print(
        f"{page}: loaded, {found['scrollWidth']} px wide in {found['innerWidth']} px, "
        f"{found['formulas']} formulas rendered, {len(problems)} problems"
    )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built HTML site (docs/_build/html)")
    parser.add_argument("pages", nargs="*", default=list(PAGES), help="pages relative to the site")
    parser.add_argument("--screenshots", type=Path, default=None, help="save a PNG of each page here")
    args = parser.parse_args(argv)
    browser = chromium()
    problems = [problem for page in args.pages for problem in check(browser, args.site, page, args.screenshots)]
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Screenshot every page of the built book with headless Chromium and measure what a reader sees.

    python scripts/screenshot_book.py [--html _build/html] [--out _build/screens] [--width 1280] [--strict]

Needs a Chromium (Debian: `apt-get install chromium`) and the `playwright` Python package
(`pip install playwright`; no browser download: the system Chromium is used). For each page it writes
a full-page PNG and records display equations wider than their column, code blocks that scroll
sideways, tables wider than their box and stderr blocks into `report.json`; `--strict` exits 1 if any
equation is cut off or any stderr block is shown. `make screens` runs it on `_build/html`.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

MEASURE = """() => {
  const wide = (el, box) => el.scrollWidth - (box || el).clientWidth;
  const out = {equations: [], code: [], tables: [], stderr: 0, code_blocks: 0};
  document.querySelectorAll('mjx-container[display="true"]').forEach(m => {
    const box = m.closest('.math, .MathJax_Display, div') || m.parentElement;
    const over = m.getBoundingClientRect().width - box.clientWidth;
    if (over > 2) out.equations.push({over: Math.round(over), text: (m.getAttribute('aria-label') || m.textContent).slice(0, 80)});
  });
  document.querySelectorAll('div.highlight pre').forEach(p => {
    out.code_blocks += 1;
    if (wide(p) > 2) out.code.push({over: wide(p), first: p.textContent.split('\\n')[0].slice(0, 80)});
  });
  document.querySelectorAll('table').forEach(t => {
    const box = t.parentElement;
    if (t.getBoundingClientRect().width - box.clientWidth > 2) out.tables.push(t.textContent.trim().slice(0, 60));
  });
  out.stderr = document.querySelectorAll('.output.stderr, .stderr').length;
  return out;
}"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", default="_build/html")
    ap.add_argument("--out", default="_build/screens")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--strict", action="store_true", help="exit 1 on a cut-off equation or a stderr block")
    args = ap.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("screenshot_book: needs `pip install playwright` (and a system Chromium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        sys.exit("screenshot_book: no Chromium on PATH (Debian: apt-get install chromium)")
    html, out = Path(args.html), Path(args.out)
    pages = sorted(p for p in html.glob("nbs/*.html")) + [html / "index.html"]
    if not pages or not (html / "index.html").exists():
        sys.exit(f"screenshot_book: no built book in {html} (run `make book` first)")
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        for p in pages:
            page.goto(p.resolve().as_uri(), wait_until="load")
            page.wait_for_load_state("load")
            page.evaluate("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
            page.wait_for_timeout(300)
            report[p.name] = page.evaluate(MEASURE)
            page.screenshot(path=str(out / f"{p.stem}.png"), full_page=True)
        browser.close()
    (out / "report.json").write_text(json.dumps(report, indent=1))
    bad = 0
    for name, r in report.items():
        n_code = len(r["code"])
        line = (f"{name:32s} equations cut: {len(r['equations']):2d}  code scrolling: {n_code:2d}/"
                f"{r['code_blocks']:<3d} tables too wide: {len(r['tables'])}  stderr: {r['stderr']}")
        print(line)
        bad += len(r["equations"]) + r["stderr"]
    print(f"screenshots and report.json in {out}")
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())

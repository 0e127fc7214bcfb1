"""Screenshot every page of the built book with headless Chromium and measure what a reader sees.

    python scripts/screenshot_book.py [--html _build/html] [--out _build/screens] [--width 1280] [--strict]
                                      [--no-shots] [--only NAME ...] [--self-test]

Needs a Chromium (Debian: `apt-get install chromium`) and the `playwright` Python package
(`pip install playwright`; no browser download: the system Chromium is used). For each page it writes
a full-page PNG and records display equations wider than their column, code blocks that scroll
sideways, tables wider than their box and stderr blocks into `report.json`; `--strict` exits 1 if any
equation is cut off or any stderr block is shown. An equation is cut off when its typeset width (the
`mjx-math` box, or the container's scrollWidth) exceeds its `mjx-container`'s width, which is the
column's minus the equation number; `--self-test` typesets a 60-term and a 3-term equation into a page
and exits 1 unless exactly the wide one is flagged. Code lines over 88 characters and blocks that
scroll sideways are counted only in code a reader sees (not in collapsed `hide-input` cells).
`make screens` runs the self-test, then the strict check on `_build/html`.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

MEASURE = """() => {
  const out = {equations: [], code: [], tables: [], stderr: 0, code_blocks: 0, long_lines: 0, code_lines: 0};
  // A display equation is cut off when its typeset content (mjx-math) is wider than the box MathJax
  // gives it: the mjx-container, which is as wide as the column minus the equation number and
  // scrolls (or clips) what does not fit. (Its own bounding box is always the column's width, so
  // comparing that against the column measures nothing.)
  document.querySelectorAll('mjx-container[display="true"]').forEach(m => {
    const math = m.querySelector('mjx-math, svg');
    const content = Math.max(m.scrollWidth, math ? math.getBoundingClientRect().width : 0);
    const over = content - m.clientWidth;
    if (over > 2) out.equations.push({over: Math.round(over), width: Math.round(content),
      column: m.clientWidth, id: (m.closest('[id]') || {}).id || '',
      text: (m.getAttribute('aria-label') || m.textContent).slice(0, 80)});
  });
  document.querySelectorAll('div.highlight pre').forEach(p => {
    const isInput = !!p.closest('.cell_input, .highlight-python, .highlight-default, .highlight-ipython3');
    if (p.closest('details:not([open])')) return;  // collapsed (hide-input): opened on purpose
    out.code_blocks += 1;
    if (isInput) p.textContent.split('\\n').forEach(l => {
      out.code_lines += 1; if (l.length > 88) out.long_lines += 1; });
    const over = p.scrollWidth - p.clientWidth;
    if (over > 2) out.code.push({over: over, first: p.textContent.split('\\n')[0].slice(0, 80)});
  });
  document.querySelectorAll('table').forEach(t => {
    const box = t.closest('.table-wrapper, .output, .cell_output, section') || t.parentElement;
    const over = Math.max(t.scrollWidth, t.getBoundingClientRect().width) - box.clientWidth;
    if (over > 2) out.tables.push(t.textContent.trim().slice(0, 60));
  });
  out.stderr = document.querySelectorAll('.output.stderr, .stderr').length;
  return out;
}"""

# An over-wide and a narrow display equation typeset into a page, to show that the check can fail.
SELF_TEST = r"""async () => {
  const first = document.querySelector('div.math');  // insert in the text column, before it
  const mk = tex => { const d = document.createElement('div'); d.className = 'math selftest';
    d.textContent = '\\[' + tex + '\\]'; first.parentElement.insertBefore(d, first); return d; };
  const terms = []; for (let i = 1; i <= 60; i++) terms.push('x_{' + i + '}');
  mk(terms.join('+')); mk('a+b=c');
  await MathJax.typesetPromise();
}"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", default="_build/html")
    ap.add_argument("--out", default="_build/screens")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--strict", action="store_true", help="exit 1 on a cut-off equation or a stderr block")
    ap.add_argument("--no-shots", action="store_true", help="measure only, no screenshots")
    ap.add_argument("--only", nargs="*", help="pages whose name contains one of these")
    ap.add_argument("--self-test", action="store_true",
                    help="typeset a 60-term and a 3-term equation into a page with maths; exit 1 unless exactly "
                    "the wide one is reported")
    args = ap.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("screenshot_book: needs `pip install playwright` (and a system Chromium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        sys.exit("screenshot_book: no Chromium on PATH (Debian: apt-get install chromium)")
    html, out = Path(args.html), Path(args.out)
    pages = sorted(html.glob("nbs/*.html"))  # the root index.html only redirects to nbs/index.html
    if not pages or not (html / "index.html").exists():
        sys.exit(f"screenshot_book: no built book in {html} (run `make book` first)")
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        if args.self_test:
            with_math = next(q for q in pages if "$$" in q.read_text() or "\\[" in q.read_text())
            page.goto(with_math.resolve().as_uri(), wait_until="load")
            page.wait_for_function("() => window.MathJax && MathJax.typesetPromise", timeout=20000)
            page.evaluate("() => MathJax.startup.promise")
            before = len(page.evaluate(MEASURE)["equations"])
            page.evaluate(SELF_TEST)
            found = page.evaluate(MEASURE)["equations"]
            browser.close()
            new = len(found) - before
            print(f"self-test: {new} equation(s) flagged after adding one over-wide and one narrow: "
                  f"{found[:1]}")
            return 0 if new == 1 and found[0]["over"] > 100 else 1
        for p in pages:
            if args.only and not any(k in p.stem for k in args.only):
                continue
            for attempt in range(3):  # a page that navigates while loading is measured again
                try:
                    page.goto(p.resolve().as_uri(), wait_until="load")
                    if "math notranslate" in page.content():  # MathJax loads deferred
                        page.wait_for_function(
                            "() => window.MathJax && MathJax.startup && MathJax.startup.document"
                            " && document.querySelector('mjx-container')", timeout=30000)
                        page.evaluate("() => MathJax.startup.promise")
                    page.wait_for_timeout(300)
                    report[p.name] = page.evaluate(MEASURE)
                    break
                except Exception as e:  # noqa: BLE001 - report and retry
                    print(f"{p.name}: {type(e).__name__}, retrying", file=sys.stderr)
            else:
                report[p.name] = page.evaluate(MEASURE)
            if not args.no_shots:
                page.screenshot(path=str(out / f"{p.stem}.png"), full_page=True)
        browser.close()
    (out / "report.json").write_text(json.dumps(report, indent=1))
    bad = 0
    for name, r in report.items():
        n_code = len(r["code"])
        line = (f"{name:32s} equations cut: {len(r['equations']):2d}  code scrolling: {n_code:2d}/"
                f"{r['code_blocks']:<3d} long lines: {r['long_lines']:3d}/{r['code_lines']:<4d} "
                f"tables too wide: {len(r['tables'])}  stderr: {r['stderr']}")
        print(line)
        bad += len(r["equations"]) + r["stderr"]
    tot = {k: sum(len(r[k]) if isinstance(r[k], list) else r[k] for r in report.values())
           for k in ("equations", "code", "code_blocks", "long_lines", "code_lines", "tables", "stderr")}
    print(f"TOTAL equations cut: {tot['equations']}  code scrolling: {tot['code']}/{tot['code_blocks']}  "
          f"long lines: {tot['long_lines']}/{tot['code_lines']}  tables too wide: {tot['tables']}  "
          f"stderr: {tot['stderr']}")
    print(f"screenshots and report.json in {out}")
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())

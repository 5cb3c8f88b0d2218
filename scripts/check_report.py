"""Open a run's report.html in headless Chromium: every figure must decode, and a screenshot
must show the figures (not a blank page).

Usage: python scripts/check_report.py RUN_DIR [--screenshot out.png]
Exit code 0 when the report renders, 1 otherwise; prints one line saying which.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def check(report: Path, screenshot: Path) -> tuple[bool, str]:
    """(ok, message) for a rendered report."""
    browser = chromium()
    if browser is None:
        return False, "no chromium on PATH (apt-get install chromium)"
    with tempfile.TemporaryDirectory() as profile:
        common = [browser, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
        dom = subprocess.run([*common, "--dump-dom", report.as_uri()], capture_output=True,
                             text=True, timeout=120).stdout
        subprocess.run([*common, "--window-size=1100,3000", f"--screenshot={screenshot}",
                        report.as_uri()], capture_output=True, timeout=120)
    figures = re.search(r'data-figures="(\d+)"', dom)
    rendered = re.search(r'data-rendered="(\d+)"', dom)
    if not figures or not rendered:
        return False, "the page did not finish loading"
    n, ok = int(figures.group(1)), int(rendered.group(1))
    if n == 0 or ok != n:
        return False, f"{ok} of {n} figures rendered"
    import numpy as np
    from PIL import Image

    with Image.open(screenshot) as shot:
        small = np.asarray(shot.convert("RGB").resize((200, 540)))
    colours = len(np.unique(small.reshape(-1, 3), axis=0))
    if colours < 50:
        return False, f"the screenshot looks blank ({colours} colours)"
    return True, f"{ok} of {n} figures rendered; screenshot {screenshot} ({colours} colours)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args(argv)
    shot = args.screenshot or args.run_dir / "report_screenshot.png"
    ok, message = check(args.run_dir / "report.html", shot)
    print(("report renders: " if ok else "report check failed: ") + message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Screenshot of a recording's first screen in the real rerun web viewer.

Serves FILE.rrd with the pinned viewer (`rerun --serve-web`, rerun-sdk 0.36.3), opens it in
headless Debian Chromium (software WebGL through SwiftShader) driven by Playwright, waits for
the WASM viewer to start and load the data, and writes a PNG. A tool for people (README
screenshot), not a CI step; `tools/rerun_screenshot.sh` sets up what it needs.

    python tools/rerun_screenshot.py demo.rrd assets/rerun_demo.png [--wait 90] [--click X,Y]
"""

import argparse
import socket
import subprocess
import sys
import time
import urllib.parse

from playwright.sync_api import sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rrd")
    ap.add_argument("png")
    ap.add_argument("--wait", type=float, default=90.0, help="seconds to let the viewer start and load")
    ap.add_argument("--width", type=int, default=1800)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--click", help="X,Y to click (in page pixels) before the shot, e.g. on a tab")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--rerun", default="rerun", help="the rerun CLI of rerun-sdk 0.36.3")
    a = ap.parse_args()

    web, grpc = free_port(), free_port()
    server = subprocess.Popen(
        [a.rerun, "--serve-web", a.rrd, "--bind", "127.0.0.1", "--web-viewer-port", str(web), "--port", str(grpc)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Wait until the gRPC proxy serving the file listens; the viewer connects to it.
        url, log, t0 = None, [], time.time()
        while url is None and time.time() - t0 < 60:
            line = server.stdout.readline()
            if not line:
                if server.poll() is not None:
                    break
                continue
            log.append(line)
            if "Listening for gRPC" in line:
                proxy = urllib.parse.quote(f"rerun+http://127.0.0.1:{grpc}/proxy", safe="")
                url = f"http://127.0.0.1:{web}/?url={proxy}"
        if url is None:
            print("rerun did not start its gRPC server:\n" + "".join(log), file=sys.stderr)
            return 2
        print(f"viewer at {url}")
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=a.chromium,
                args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"],
            )
            page = browser.new_page(viewport={"width": a.width, "height": a.height})
            page.on("console", lambda m: m.type == "error" and print("console:", m.text, file=sys.stderr))
            page.goto(url)
            # The WASM bundle needs about a minute to start under SwiftShader; then the data loads.
            time.sleep(a.wait)
            if a.click:
                x, y = (float(v) for v in a.click.split(","))
                page.mouse.click(x, y)
                time.sleep(10)
            page.screenshot(path=a.png)
            browser.close()
        print(f"wrote {a.png}")
        return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())

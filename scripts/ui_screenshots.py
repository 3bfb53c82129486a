#!/usr/bin/env python3
"""Screenshots of every example workflow in the real ComfyUI web UI, and the template thumbnails.

Needs a running ComfyUI with this pack (see README → Tests) and Playwright with Debian's chromium
(`apt-get install chromium`; never `playwright install`). For each template the pack serves it
loads the workflow in the UI; the Shapes ones (which need no checkpoint) are also run there, and
the screenshot shows the finished run with its previews. Writes
- docs/images/ui/<stem>.jpg: the UI screenshot (README pictures);
- workflows/<stem>.jpg: the template browser's thumbnail: a Shapes template's saved images side
  by side, an SD1.5 template's graph (no checkpoint here to run it with).

    python scripts/ui_screenshots.py --url http://127.0.0.1:8188
"""

from __future__ import annotations

import argparse
import io
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PACK = "comfyui-concept-sliders"
THUMBNAIL_WIDTH = 512


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def wait_idle(base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    time.sleep(1.0)
    while json.loads(get(f"{base}/queue"))["queue_running"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the workflow did not finish")
        time.sleep(1.0)


def output_images(base: str) -> list[Image.Image]:
    """The images the latest prompt saved, in node order."""
    history = json.loads(get(f"{base}/history?max_items=1"))
    entry = next(iter(history.values()))
    images = []
    for node_id in sorted(entry["outputs"], key=int):
        for image in entry["outputs"][node_id].get("images", []):
            query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
            images.append(Image.open(io.BytesIO(get(f"{base}/view?{query}"))).convert("RGB"))
    return images


def side_by_side(images: list[Image.Image], height: int = 256) -> Image.Image:
    scaled = [im.resize((max(1, im.width * height // im.height), height), Image.NEAREST) for im in images]
    out = Image.new("RGB", (sum(im.width for im in scaled) + 8 * (len(scaled) - 1), height), "white")
    x = 0
    for im in scaled:
        out.paste(im, (x, 0))
        x += im.width + 8
    return out


def save_jpeg(image: Image.Image, path: Path, width: int | None = None) -> None:
    if width and image.width > width:
        image = image.resize((width, image.height * width // image.width), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=85)
    print(f"wrote {path.relative_to(REPO)}")


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--no-run", action="store_true", help="only load the workflows, run nothing")
    parser.add_argument("--only", help="only the templates whose name contains this text")
    args = parser.parse_args()
    base = args.url.rstrip("/")
    names = json.loads(get(f"{base}/workflow_templates"))[PACK]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 2200, "height": 1300})
        page.goto(base + "/")
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=60000)
        page.wait_for_timeout(2000)
        page.keyboard.press("Escape")
        # readable pictures: no minimap over the graph, full detail at any zoom
        page.evaluate("""async () => { const s = window.app.extensionManager.setting;
            await s.set("Comfy.Minimap.Visible", false); await s.set("LiteGraph.Canvas.MinFontSizeForLOD", 0); }""")
        for name in sorted(n for n in names if args.only is None or args.only in n):
            url = f"{base}/api/workflow_templates/{PACK}/{urllib.parse.quote(name)}.json"
            page.evaluate("async url => { const r = await fetch(url); await window.app.loadGraphData(await r.json()); }",
                          url)
            page.wait_for_timeout(1000)
            page.keyboard.press("Escape")
            run = name.startswith("Shapes") and not args.no_run
            if run:
                page.evaluate("() => window.app.queuePrompt(0, 1)")
                wait_idle(base, timeout=900)
                page.wait_for_timeout(1500)
            page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
            page.wait_for_timeout(800)
            shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
            save_jpeg(shot, REPO / "docs" / "images" / "ui" / f"{name}.jpg")
            thumbnail = side_by_side(output_images(base)) if run else shot
            save_jpeg(thumbnail, REPO / "workflows" / f"{name}.jpg", THUMBNAIL_WIDTH)
        browser.close()


if __name__ == "__main__":
    main()

"""`vitlab serve` as a person uses it: start the command, open the printed address in headless
Chromium, choose, drop and paste images, see each one's predicted class, probability bars and
attention overlay, then stop the server with Ctrl-C.

The browser is Debian's `chromium` driven by Playwright (its own browser download needs the
internet). The test finds `chromium` on PATH or, as root with apt-get, installs it; anywhere else it
fails saying how to install it, so the browser test never silently skips.
"""

from __future__ import annotations

import base64
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

import vitlab
from tests.image_fixtures import class_image, train_tiny_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_or_install_chromium() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                pytest.fail(f"`{' '.join(command)}` failed, so the browser test has no browser:\n"
                            f"{done.stdout[-1500:]}{done.stderr[-1500:]}")
        if path := shutil.which("chromium"):
            return path
    pytest.fail("the browser test needs headless Chromium: install Debian's package "
                "(sudo apt-get install chromium) or put chromium on PATH, then run the tests again")


@pytest.fixture(scope="session")
def chromium() -> str:
    return find_or_install_chromium()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-browser")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITLAB_CACHE", str(root / "cache"))
        yield train_tiny_run(root)


class ServeProcess:
    """`vitlab serve RUN --port 0` as a user starts it, its output read line by line."""

    def __init__(self, run):
        self.process = subprocess.Popen([sys.executable, "-m", "vitlab", "serve", str(run), "--port", "0"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"vitlab serve printed no {pattern!r} in {timeout}s:\n{''.join(self.output)}")
            if line is None:
                pytest.fail(f"vitlab serve ended before printing {pattern!r}:\n{''.join(self.output)}")
            self.output.append(line)
            if found := re.search(pattern, line):
                return found


def png_file(tmp_path, name: str, cls: int, seed: int):
    """A test-class picture at 96x96 (the server scales it to the model's 16x16)."""
    image = Image.fromarray(class_image(cls, np.random.default_rng(seed), 16)).resize((96, 96), Image.NEAREST)
    path = tmp_path / name
    image.save(path)
    return path, image


def drop_or_paste(page, event: str, name: str, data: bytes, mime: str) -> None:
    """Fires a drop on the drop zone, or a paste on the page, carrying one file, as the browser
    does when a person drags a file in or presses Ctrl+V with an image copied."""
    page.evaluate("""([event, name, b64, mime]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], name, { type: mime }));
        if (event === "drop") {
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", { dataTransfer: files, bubbles: true, cancelable: true }));
        } else {
            document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: files, bubbles: true }));
        }
    }""", [event, name, base64.b64encode(data).decode(), mime])


def test_drop_an_image_see_the_prediction_and_overlay_then_ctrl_c(run, chromium, tmp_path):
    classifier = vitlab.load(run)
    circle, circle_image = png_file(tmp_path, "circle.png", 0, seed=11)
    stripes, stripes_image = png_file(tmp_path, "stripes.png", 2, seed=12)
    cross, cross_image = png_file(tmp_path, "cross.png", 1, seed=13)
    expected = {name: classifier.predict(image, top_k=1)[0][0][0]
                for name, image in (("circle.png", circle_image), ("stripes.png", stripes_image),
                                    ("cross.png", cross_image))}
    assert expected == {"circle.png": "circle", "stripes.png": "stripes", "cross.png": "cross"}

    server = ServeProcess(run)
    try:
        url = server.wait_for(r"open (http://127\.0\.0\.1:\d+/)")[1]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url)
            expect(page.locator("#model")).to_contain_text("3 classes")
            expect(page.locator("#model")).to_contain_text("validation top-1")

            page.set_input_files("#files", str(circle))  # "choose files"
            drop_or_paste(page, "drop", "stripes.png", stripes.read_bytes(), "image/png")
            drop_or_paste(page, "paste", "cross.png", cross.read_bytes(), "image/png")
            drop_or_paste(page, "drop", "notes.txt", b"not a picture", "text/plain")

            for name, label in expected.items():
                card = page.locator(".card").filter(has=page.locator(".name", has_text=name))
                expect(card).to_have_attribute("data-state", "done", timeout=30_000)
                expect(card.locator(".bars li")).to_have_count(3)
                expect(card.locator(".bars li").first.locator(".label")).to_have_text(label)
                assert re.fullmatch(r"\d+(\.\d+)?%", card.locator(".bars li .value").first.inner_text())
                expect(card.locator(".time")).to_contain_text(re.compile(r"model \d+\.\d ms"))
                overlay = card.locator("img.overlay")
                assert overlay.evaluate("img => img.complete && img.naturalWidth") == 256, name
                assert overlay.is_visible()

            bad = page.locator(".card").filter(has=page.locator(".name", has_text="notes.txt"))
            expect(bad).to_have_attribute("data-state", "error", timeout=30_000)
            expect(bad.locator(".error")).to_contain_text("notes.txt: not an image")
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            browser.close()
        assert Image.open(tmp_path / "serve.png").size[0] == 1100
    finally:
        server.process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            pytest.fail("vitlab serve did not stop within 30 s of Ctrl-C")
    server.wait_for("vitlab serve: stopped", timeout=10)
    assert code == 0
    assert "Traceback" not in "".join(server.output)

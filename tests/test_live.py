"""`experiments.live` in a real browser: headless Debian chromium driven by selenium.

The server runs as the user runs it (`python -m experiments.live`, a subprocess bound to
127.0.0.1 on a free port, stopped with SIGINT as Ctrl-C does); the page is opened in
chromium, which plays the clip; the test waits for captions, checks them against
`experiments.stream` and against a replay of the settings the page changed, pauses and
resumes, and saves a screenshot (`CASA_LIVE_SCREENSHOT=docs/img/live.png` to keep it).
Every wait is bounded in time. The checkpoint is test_inference's tiny CASA⊕ (`run`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.data_fixtures import encode_clip
from tests.test_inference import run  # noqa: F401  (the module fixture: a tiny trained checkpoint)

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ROOT = Path(__file__).resolve().parents[1]
if not (CHROMIUM and DRIVER):
    if os.environ.get("CI"):  # CI installs them (.ci/run): a missing browser there is a failure, not a skip
        raise RuntimeError("CI needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", "--window-size=1280,760"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, every: float = 0.1):
    """Poll `check()` until it returns something truthy, at most `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for f in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(f)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def serve(argv: list[str], tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.live", *argv, "--port", str(port), "--threads", "1"],
                            cwd=tmp_path, env=env, stdout=open(tmp_path / "out.txt", "w"),
                            stderr=open(tmp_path / "err.txt", "w"))
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}: {(tmp_path / 'err.txt').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_for(up, 180, "the server to listen", every=0.25)  # a loaded 2-core CI host
    return proc, url


def stop(proc: subprocess.Popen, tmp_path: Path) -> str:
    """Ctrl-C: SIGINT, then the process must end by itself, cleanly."""
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the server did not stop within 30 s of SIGINT")
    out = (tmp_path / "out.txt").read_text()
    assert code == 0 and "experiments.live: stopped" in out, (code, out, (tmp_path / "err.txt").read_text())
    return out


def state(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/state", timeout=5) as r:
        return json.loads(r.read())


def test_live_page_in_chromium(run, tmp_path, browser, capsys):  # noqa: F811
    from selenium.webdriver.common.by import By

    clip = encode_clip(tmp_path / "clip.webm", [i / 25 for i in range(300)], "libvpx-vp9")  # 12 s, VP9 plays anywhere
    ckpt = str(run["casa"])
    proc, url = serve(["--ckpt", ckpt, "--video", str(clip), "--max-new-tokens", "4"], tmp_path)
    try:
        browser.get(url)
        rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#captions .caption")  # noqa: E731
        wait_for(lambda: len(rows()) >= 3, 60, ">= 3 captions on the page")
        assert browser.execute_script("return document.querySelector('video').currentTime") > 0  # it plays
        # a control: the repetition penalty, typed in and committed as a person does
        box = browser.find_element(By.ID, "repetition_penalty")
        box.clear()
        box.send_keys("3\t")
        wait_for(lambda: "repetition penalty 3" in browser.find_element(By.ID, "active").text, 10, "the new setting")
        events = lambda: [e for e in state(url)["events"] if e["type"] == "caption"]  # noqa: E731
        wait_for(lambda: sum(e["settings"]["repetition_penalty"] == 3.0 for e in events()) >= 2, 30,
                 "two frames captioned with the new penalty")
        # pause: the video and the captioner stop together; resume: both go on
        browser.find_element(By.ID, "pause").click()
        wait_for(lambda: state(url)["settings"]["paused"], 10, "the pause")
        time.sleep(0.3)  # a frame already being captioned may still land
        held = len(events())
        time.sleep(1.5)
        assert len(events()) == held and browser.execute_script("return document.querySelector('video').paused")
        browser.find_element(By.ID, "pause").click()
        wait_for(lambda: len(events()) > held, 20, "captions after resuming")
        browser.execute_script("window.scrollTo(0, 0)")
        shot = Path(os.environ.get("CASA_LIVE_SCREENSHOT") or tmp_path / "live.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        page = [(int(r.get_attribute("data-index")), r.find_element(By.CLASS_NAME, "x").text) for r in rows()]
        attention = [b.get_attribute("style") for b in browser.find_elements(By.CSS_SELECTOR, ".bar div")]
        seen = events()
    finally:
        out = stop(proc, tmp_path)
    assert all("width" in s for s in attention)  # the Fig. 7 panel was drawn from the CASA layers
    assert all(abs(sum(e["attention"].values()) - 1) < 1e-4 for e in seen)

    # the page's captions are experiments.stream's for the frames before the change ...
    from experiments.stream import main as stream_main

    assert stream_main(["--ckpt", ckpt, "--video", str(clip), "--no-wait", "--json", "--max-new-tokens", "4",
                        "--threads", "1", "--srt", str(tmp_path / "s.srt")]) == 0
    reference = {r["index"]: r["text"].strip() for r in json.loads(capsys.readouterr().out)["frames"]}
    changed = min(e["index"] for e in seen if e["settings"]["repetition_penalty"] == 3.0)
    before = [(i, t) for i, t in page if i < changed]
    assert len(before) >= 3 and before == [(i, reference[i]) for i, t in before]
    # ... and after it, a replay of the same session with the penalty from that frame on
    from casa.assistant import load
    from casa.captioning import CaptionSession
    from experiments.stream import video_frames

    assistant = load(ckpt)
    config = assistant.generation_config(max_new_tokens=4)
    session = CaptionSession(assistant, config=config)
    penalised = assistant.generation_config(max_new_tokens=4, repetition_penalty=3.0)
    by_index = {e["index"]: e for e in seen}
    for i, frame in enumerate(video_frames(str(clip), 2.0)):
        if i > max(by_index):
            break
        text = session.step(frame.image, i, penalised if i >= changed else config).text.strip()
        assert text == by_index[i]["text"], (i, text, by_index[i])
    assert any(by_index[i]["text"] != reference[i] for i in by_index if i >= changed)  # it changed the captions
    assert f"] {reference[0]}" in out or not reference[0]  # the terminal prints the captions too


def test_a_bad_video_is_one_line_on_the_page_and_in_the_terminal(run, tmp_path, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    (tmp_path / "cut.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)  # not a video
    proc, url = serve(["--ckpt", str(run["casa"]), "--video", str(tmp_path / "cut.mp4")], tmp_path)
    try:
        browser.get(url)
        shown = wait_for(lambda: browser.find_element(By.ID, "error").text, 30, "the error on the page")
    finally:
        stop(proc, tmp_path)
    err = (tmp_path / "err.txt").read_text().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("experiments.live: error: ") and "cut.mp4" in err[0], err
    assert shown == err[0][len("experiments.live: error: "):] and "Traceback" not in shown

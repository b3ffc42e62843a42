"""The web console in a real browser: Debian's Chromium driven by Selenium against a real
`voiceprint serve`, with Chromium's fake microphone playing real speech from ../shared/data.

A person enrolls three speakers by speaking, identifies one, reviews a held utterance,
refreshes and rolls back as admin, erases a speaker; a query key sees no admin controls
and the server refuses them anyway. Screenshots go to $VOICEPRINT_SCREENSHOTS (else a
temporary folder); the path is printed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from test_service import Server, make_home
from voiceprint.engine import Engine
from voiceprint.engine.errors import VoiceprintError
from voiceprint.engine.manifests import read_manifest

pytestmark = pytest.mark.data

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian's packages
# A profile made by voice is one long utterance: checked for consistency from the first.
CONFIG = """
[enrollment]
required_speech_s = 8.0
consistency_min_count = 1
[refresh]
steps = 2
speakers_per_batch = 4
holdout_fraction = 0.3
gate = false
"""


@pytest.fixture(scope="module")
def browser_installed() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        message = f"{', '.join(missing)} missing: the browser tests need `apt-get install chromium chromium-driver` (as root)"
        if os.environ.get("VOICEPRINT_REQUIRE_BROWSER") == "1":  # CI installs them: a missing browser is a failure there
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("VOICEPRINT_SCREENSHOTS") or tmp_path_factory.mktemp("console-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def voices(by_speaker) -> dict[str, list[Path]]:
    return by_speaker("librispeech-test-other")


@pytest.fixture(scope="module")
def server(tmp_path_factory, dev_data, browser_installed) -> Iterator[Server]:
    """A server over a calibrated population of 32 speechocean762 speakers (3 files each),
    so that refreshes have data and the calibration view has a DET curve to draw."""
    home, db, keys = make_home(tmp_path_factory.mktemp("console"), config=CONFIG + "[scoring]\nmin_calibration_speakers = 30\n")
    files = read_manifest(dev_data / "speechocean762-train" / "manifest.csv")
    speakers = sorted({f.speaker for f in files})[:32]
    with Engine.open(home, db) as eng:
        for speaker in speakers:
            for f in [f for f in files if f.speaker == speaker][:3]:
                with contextlib.suppress(VoiceprintError):  # a short or noisy file: the others are enough
                    eng.enroll(speaker, f.path)
        eng.calibrate()
    srv = Server(home, db, keys, home.parent / "server.log").start()
    yield srv
    srv.stop()


def microphone(folder: Path, name: str, paths: list[Path]) -> Path:
    """One WAV of ``paths`` end to end: what the fake microphone plays (in a loop)."""
    out = folder / f"{name}.wav"
    sf.write(out, np.concatenate([sf.read(p, dtype="float32")[0] for p in paths]), 16000, subtype="PCM_16")
    return out


@contextlib.contextmanager
def chromium(mic: Path | None = None) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1280,900", "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"):  # allow the mic without asking
        options.add_argument(arg)
    if mic is not None:
        options.add_argument(f"--use-file-for-fake-audio-capture={mic}")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout: float = 60, message: str = ""):
    """``condition()``'s first true value; tables the page redraws may swap an element
    out between finding and reading it, which only means: look again."""
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(lambda d: condition(), message)


def log_in(driver, srv: Server, key: str) -> None:
    driver.get(srv.url + "/console")
    driver.find_element(By.ID, "login-key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(driver, lambda: driver.find_element(By.ID, "tabs").is_displayed(), 30, "the console did not open")


def tab(driver, view: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#tabs button[data-view={view}]").click()
    wait(driver, lambda: driver.find_element(By.ID, view).is_displayed())


def enroll_by_voice(driver, speaker: str, *, stop_when=None) -> list[float]:
    """Start an enrollment and watch it; the progress values seen, in order. Ends by
    itself at 100 %, or by Stop once ``stop_when()`` holds."""
    tab(driver, "speak")
    field = driver.find_element(By.ID, "enroll-speaker")
    field.clear()
    field.send_keys(speaker)
    driver.find_element(By.ID, "enroll-start").click()
    seen: list[float] = []
    result = driver.find_element(By.ID, "enroll-result")
    deadline = time.monotonic() + 90
    while not result.text:
        assert time.monotonic() < deadline, driver.find_element(By.ID, "enroll-status").text
        seen.append(float(driver.find_element(By.ID, "enroll-bar").get_attribute("data-progress")))
        if stop_when is not None and stop_when():
            driver.find_element(By.ID, "enroll-stop").click()
            stop_when = None
        time.sleep(0.1)
    return seen


def admin_api(srv: Server, method: str, route: str) -> httpx.Response:
    return srv.client.request(method, route, headers={"X-API-Key": srv.keys["admin"]})


def test_a_person_enrolls_identifies_reviews_refreshes_and_rolls_back(server, voices, shots, tmp_path):
    names = sorted(voices)
    a, b, c, other = names[:4]

    # Three speakers enroll by speaking until their profile is complete.
    for speaker in (a, b, c):
        with chromium(microphone(tmp_path, speaker, voices[speaker][:3])) as driver:
            log_in(driver, server, server.keys["admin"])
            seen = enroll_by_voice(driver, speaker)
            assert seen == sorted(seen) and seen[-1] >= 1.0, seen  # rose steadily to 100 %
            assert len(set(seen)) > 5, seen  # the person watched it fill, not jump
            assert driver.find_element(By.ID, "enroll-result").get_attribute("data-feedback") == "OK"
            assert "Enrolled" in driver.find_element(By.ID, "enroll-result").text
            driver.save_screenshot(str(shots / f"1-enroll-{speaker}.png"))
    profiles = {s["name"]: s for s in admin_api(server, "GET", "/v1/speakers").json()}
    assert all(profiles[s]["utterances"] == 1 and profiles[s]["speech_s"] >= 8.0 for s in (a, b, c)), profiles

    # One of them is identified by voice (other recordings than those enrolled) and from a file.
    with chromium(microphone(tmp_path, f"{a}-probe", voices[a][5:8])) as driver:
        log_in(driver, server, server.keys["admin"])
        driver.find_element(By.ID, "recognize-start").click()
        answer = driver.find_element(By.ID, "recognize-result")
        wait(driver, lambda: answer.get_attribute("data-final") == "false", 60, "no answer while speaking")
        time.sleep(3)
        driver.find_element(By.ID, "recognize-stop").click()
        wait(driver, lambda: answer.get_attribute("data-final") == "true", 60, "no final answer")
        assert answer.find_element(By.CSS_SELECTOR, ".decision").text == a
        assert answer.find_element(By.CSS_SELECTOR, "table.candidates tbody td").text == a
        driver.save_screenshot(str(shots / "2-identify-by-voice.png"))
        driver.find_element(By.ID, "recognize-file").send_keys(str(voices[a][9]))
        wait(driver, lambda: answer.get_attribute("data-final") == "true"
             and driver.find_element(By.ID, "recognize-status").text == voices[a][9].name, 60)
        assert answer.find_element(By.CSS_SELECTOR, "table.candidates tbody td").text == a

        # Someone else speaks into a's enrollment: the console says so while they speak,
        # and the recording is held for review, outside a's profile.
        with chromium(microphone(tmp_path, other, voices[other][:3])) as intruder:
            log_in(intruder, server, server.keys["admin"])
            status = intruder.find_element(By.ID, "enroll-status")
            enroll_by_voice(intruder, a, stop_when=lambda: "INCONSISTENT_SPEAKER" in status.text)
            result = intruder.find_element(By.ID, "enroll-result")
            assert result.get_attribute("data-feedback") == "INCONSISTENT_SPEAKER", result.text
            intruder.save_screenshot(str(shots / "3-held-for-review.png"))

        # The admin listens to the held utterance and accepts it.
        tab(driver, "speakers")
        row = f"#speaker-table tr[data-speaker='{a}']"
        wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, f"{row} td")[3].text == "1")  # one held for review
        driver.find_element(By.CSS_SELECTOR, row).find_element(By.XPATH, ".//button[text()='Utterances']").click()
        held = wait(driver, lambda: driver.find_element(By.CSS_SELECTOR, "#utterance-table tr[data-status=held_for_review]"))
        held_id = int(held.get_attribute("data-utterance"))
        held.find_element(By.XPATH, ".//button[text()='Play']").click()
        wait(driver, lambda: driver.execute_script(
            "const a = document.querySelector('audio[data-utterance]'); return a && a.readyState >= 1 && a.duration > 1"), 30,
            "the held recording did not load")
        driver.save_screenshot(str(shots / "4-review.png"))
        driver.find_element(By.CSS_SELECTOR, f"#utterance-table tr[data-utterance='{held_id}']").find_element(
            By.XPATH, ".//button[text()='Accept']").click()
        wait(driver, lambda: driver.find_element(
            By.CSS_SELECTOR, f"#utterance-table tr[data-utterance='{held_id}']").get_attribute("data-status") == "enrolled")
        assert admin_api(server, "GET", f"/v1/speakers/{a}").json()["held_for_review"] == []

        # A refresh as admin, followed live in the jobs table; then a rollback.
        tab(driver, "versions")
        driver.find_element(By.ID, "refresh-now").click()
        progress_seen = []

        def finished() -> bool:
            rows = driver.find_elements(By.CSS_SELECTOR, "#job-table tbody tr[data-job]")
            if rows and rows[0].get_attribute("data-status") == "running":
                progress_seen.append(rows[0].find_elements(By.TAG_NAME, "td")[3].text)
            return bool(rows) and rows[0].get_attribute("data-status") in ("succeeded", "rejected", "failed")

        wait(driver, finished, 600, "the refresh did not finish")
        assert wait(driver, lambda: driver.find_element(By.CSS_SELECTOR, "#job-table tbody tr[data-job]").get_attribute("data-status")) == "succeeded"
        assert any("/" in text for text in progress_seen), progress_seen  # stage done/total while it ran
        wait(driver, lambda: "active" in driver.find_element(By.CSS_SELECTOR, "#timeline li[data-version='2']").get_attribute("class"))
        wait(driver, lambda: "from version 1" in driver.find_element(By.CSS_SELECTOR, "#timeline li[data-version='2']").text
             and driver.find_elements(By.CSS_SELECTOR, "#timeline li[data-version='2'] table.gate"))  # its parent and gate metrics
        driver.save_screenshot(str(shots / "5-refreshed.png"))
        driver.find_element(By.CSS_SELECTOR, "#timeline li[data-version='1'] button.rollback").click()
        driver.find_element(By.ID, "confirm-ok").click()
        wait(driver, lambda: "active" in driver.find_element(By.CSS_SELECTOR, "#timeline li[data-version='1']").get_attribute("class"))
        assert [v["number"] for v in admin_api(server, "GET", "/v1/versions").json() if v["active"]] == [1]
        driver.save_screenshot(str(shots / "6-rolled-back.png"))

        # The calibration view: the decision state and the DET curve of the active version.
        tab(driver, "calibration")
        wait(driver, lambda: driver.execute_script("const i = document.getElementById('det'); return !i.hidden && i.naturalWidth > 0"),
             60, driver.find_element(By.ID, "det-note").text)
        assert "decides with" in driver.find_element(By.ID, "decision-table").text
        driver.save_screenshot(str(shots / "7-calibration.png"))

        # Erasing asks for the name to be typed; a wrong one erases nothing.
        tab(driver, "speakers")
        erase = lambda: wait(driver, lambda: driver.find_element(  # noqa: E731
            By.CSS_SELECTOR, f"#speaker-table tr[data-speaker='{c}'] button.danger")).click()
        erase()
        driver.find_element(By.ID, "confirm-typed").send_keys("someone else")
        driver.find_element(By.ID, "confirm-ok").click()
        time.sleep(1)
        assert admin_api(server, "GET", f"/v1/speakers/{c}").status_code == 200
        erase()
        driver.find_element(By.ID, "confirm-typed").send_keys(c)
        driver.find_element(By.ID, "confirm-ok").click()
        wait(driver, lambda: not driver.find_elements(By.CSS_SELECTOR, f"#speaker-table tr[data-speaker='{c}']"))
        assert admin_api(server, "GET", f"/v1/speakers/{c}").status_code == 404

        # Everything the page loaded came from the server itself (no CDN).
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(u.startswith(server.url) or u.startswith(("blob:", "data:")) for u in loaded), loaded
    assert not any(key in server.log.read_text() for key in server.keys.values())  # no key reached a URL or a log


def test_a_query_key_sees_no_admin_controls_and_the_server_refuses_them(server, shots):
    with chromium() as driver:
        driver.get(server.url + "/console")
        driver.find_element(By.ID, "login-key").send_keys("vp_not-a-key")
        driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
        wait(driver, lambda: "not valid" in driver.find_element(By.ID, "login-error").text, 30)
        assert not driver.find_element(By.ID, "tabs").is_displayed()

        log_in(driver, server, server.keys["query"])
        visible = [t.get_attribute("data-view") for t in driver.find_elements(By.CSS_SELECTOR, "#tabs button") if t.is_displayed()]
        assert visible == ["speak"]
        assert driver.find_element(By.ID, "recognize-panel").is_displayed()
        assert not driver.find_element(By.ID, "enroll-panel").is_displayed()  # query keys cannot enroll
        shown = [e.get_attribute("outerHTML")[:80] for e in driver.find_elements(By.CSS_SELECTOR, "[data-needs=admin], [data-needs=enroll]")
                 if e.is_displayed()]
        assert shown == []
        driver.save_screenshot(str(shots / "8-query-key.png"))
        # The page's own key, asking for what the page does not offer: refused by the server.
        statuses = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const headers = {"X-API-Key": sessionStorage.getItem("voiceprint.key")};
            Promise.all([
              fetch("/v1/refresh", {method: "POST", headers}),
              fetch("/v1/versions/1/activate", {method: "POST", headers}),
              fetch("/v1/versions", {headers}),
              fetch("/v1/speakers", {headers}),
            ]).then(rs => done(rs.map(r => r.status)));
        """)
        assert statuses == [403, 403, 403, 403]
        assert driver.execute_script("return sessionStorage.getItem('voiceprint.key')") == server.keys["query"]
        assert server.keys["query"] not in driver.current_url and not driver.get_cookies()
        driver.find_element(By.ID, "logout").click()
        assert driver.execute_script("return sessionStorage.getItem('voiceprint.key')") is None
        assert driver.find_element(By.ID, "login").is_displayed()

"""The rating page in a real browser (headless Chromium from Debian's packages, through
selenium) against the real feedback service, a real reward service ranking its queue, and
the real broker: choices made with the keyboard and the mouse arrive as joined labels with
the right winner; the AI labeller's labels arrive flagged as AI, and its agreement with the
humans is in the stats. The screenshot is kept (RLHF_ARTIFACTS_DIR, else the test's tmp dir).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Producer, now_ms
from rlhf_common.topics import Topics
from rlhf_devstack.stack import free_port
from rlhf_feedback.config import FeedbackConfig
from rlhf_reward.config import RewardConfig

from tests.helpers import metric_value, read_topic, scrape, start_service

pytestmark = [pytest.mark.integration]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
N_PAIRS = 6


def _browser():
    if not (CHROMIUM and CHROMEDRIVER):
        # Only when the machine truly has no browser: `make test` installs Debian's chromium
        # and chromium-driver (target browser-deps) before running the tests.
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _generations() -> list[events_pb2.Generation]:
    out = []
    for i in range(N_PAIRS):
        request = f"req-{i}"
        for side in ("first", "second"):
            out.append(events_pb2.Generation(
                generation_id=uuid.uuid4().hex, request_id=request, prompt=f"Question {i}: tell me about topic {i}.",
                response=f"The {side} answer to question {i}, with detail {uuid.uuid4().hex[:6]}.",
                policy_version=3, created_unix_ms=now_ms()))
    return out


def _wait(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_rating_page_choices_become_labels_with_the_right_winner(bus, tiny_models, tmp_path):
    policy_model, reward_model = tiny_models
    rcfg = RewardConfig(server={"port": free_port(), "metrics_port": 0}, model=str(reward_model), http_port=0,
                        max_length=64, subscribe_weights=False)
    cfg = FeedbackConfig(server={"port": free_port(), "metrics_port": free_port()}, http_port=free_port(),
                         state_dir=str(tmp_path / "state"), wait_s=60, rate_strategy="uncertainty",
                         rate_reward_addrs=f"127.0.0.1:{rcfg.server.port}", rate_rank_every_s=0.3,
                         rate_repeat_share=0.0, judge_enabled=True, judge_backend="folder",
                         judge_model=str(policy_model), judge_every_s=0.3, judge_max_chars=200)
    procs = [start_service("rlhf_reward", rcfg, tmp_path / "reward.log", bus)]
    driver = None
    try:
        procs.append(start_service("rlhf_feedback", cfg, tmp_path / "feedback.log", bus))
        gens = _generations()
        p = Producer(bus, client_id="test-policy")
        for g in gens:  # what the policy records for answers it served
            p.send(Topics(bus.topic_prefix).generations, g.generation_id, g)
        p.close()
        by_text = {g.response: g for g in gens}
        # the queue has paired them, and the reward service has ranked them
        def ranked() -> bool:
            text = scrape(cfg.server.metrics_port)
            return (metric_value(text, "rlhf_feedback_rate_open_pairs") == N_PAIRS
                    and (metric_value(text, "rlhf_feedback_rate_ranked_total") or 0) >= N_PAIRS)

        _wait(ranked, 60, "the queue to pair and rank every answer")

        driver = _browser()
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        base = f"http://127.0.0.1:{cfg.http_port}"
        driver.get(base + "/rate")
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
        driver.find_element(By.ID, "rater").send_keys("tester")
        driver.find_element(By.CSS_SELECTOR, "#settings-form button").click()
        # accessible: every input has a label, every answer a heading, the status is announced
        for field in ("rater", "apikey", "reason"):
            assert driver.find_elements(By.CSS_SELECTOR, f"label[for={field}]")
        assert driver.find_element(By.ID, "status").get_attribute("aria-live") == "polite"
        body = driver.find_element(By.TAG_NAME, "body")
        inputs = [("key", "1"), ("click", "choose-b"), ("key", Keys.ARROW_LEFT), ("key", Keys.ARROW_DOWN),
                  ("key", "2"), ("click", "choose-a")]
        chosen: dict[str, tuple[str, str, str]] = {}  # prompt -> (choice, left text, right text)
        for n, (how, what) in enumerate(inputs):
            ticket = _wait(lambda: driver.find_element(By.ID, "pair").is_displayed() and
                           driver.find_element(By.ID, "pair").get_attribute("data-ticket"), 30, "a pair on the page")
            prompt = driver.find_element(By.ID, "prompt").text
            left, right = driver.find_element(By.ID, "answer-a").text, driver.find_element(By.ID, "answer-b").text
            assert {left, right} <= set(by_text) and by_text[left].prompt == by_text[right].prompt == prompt
            assert "version" not in driver.page_source.lower()  # nothing tells the versions apart
            if n == 1:
                driver.find_element(By.ID, "reason").send_keys("B names the detail")
                body.click()  # leave the text box before the next shortcut
            if n == 2:
                driver.save_screenshot(str(tmp_path / "rating-page.png"))
            if how == "key":
                body.send_keys(what)
            else:
                driver.find_element(By.ID, what).click()
            choice = {"1": "a", Keys.ARROW_LEFT: "a", "2": "b", Keys.ARROW_DOWN: "tie",
                      "choose-a": "a", "choose-b": "b"}[what]
            chosen[prompt] = (choice, left, right)
            _wait(lambda: driver.find_element(By.ID, "count").text == str(n + 1), 30, f"choice {n + 1} saved")
            assert driver.find_element(By.ID, "pair").get_attribute("data-ticket") != ticket or n == len(inputs) - 1
        assert len(chosen) == N_PAIRS  # every pair once, no repeat (repeat share 0)
        # the queue is empty now: the page says so
        _wait(lambda: "No pair is waiting" in driver.find_element(By.ID, "status").text, 10, "the empty queue")
        # phone width: nothing overflows sideways
        driver.set_window_size(390, 844)
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")

        labels = read_topic(bus, Topics(bus.topic_prefix).labels, events_pb2.Label,
                            until=lambda ls: sum(x.source == events_pb2.LABEL_SOURCE_HUMAN for x in ls) >= N_PAIRS
                            and any(x.source == events_pb2.LABEL_SOURCE_AI for x in ls), timeout_s=90)
        human = [x for x in labels if x.source == events_pb2.LABEL_SOURCE_HUMAN]
        assert len({x.label_id for x in human}) == N_PAIRS
        for x in human:
            choice, left, right = chosen[x.prompt]
            # the label names the answer shown on the left first, with its generation and version
            assert [r.text for r in x.responses] == [left, right]
            assert [r.generation_id for r in x.responses] == [by_text[left].generation_id,
                                                              by_text[right].generation_id]
            assert all(r.policy_version == 3 for r in x.responses)
            assert x.pairwise.choice == {"a": events_pb2.CHOICE_A, "b": events_pb2.CHOICE_B,
                                         "tie": events_pb2.CHOICE_TIE}[choice]
        ai = [x for x in labels if x.source == events_pb2.LABEL_SOURCE_AI]
        assert all(x.pairwise.choice in (events_pb2.CHOICE_A, events_pb2.CHOICE_B) for x in ai)
        feedback = read_topic(bus, Topics(bus.topic_prefix).feedback, events_pb2.Feedback,
                              until=lambda fs: any(f.comment for f in fs), timeout_s=30)
        assert [(f.comment, f.user_id) for f in feedback if f.comment] == [("B names the detail", "tester")]

        def stats():
            s = httpx.get(base + "/v1/feedback/stats", timeout=10).json()
            return s if s["ai"]["compared"] == N_PAIRS and s["labels_by_source"].get("ai") == len(ai) else None

        s = _wait(stats, 60, "the AI labeller to judge every rated pair")
        counts = {(c["kind"], c["outcome"]): c["count"] for c in s["counts"]}
        assert counts[("pairwise", "joined")] == N_PAIRS + len(ai)
        assert s["labels_by_source"]["human"] == N_PAIRS
        assert s["raters"] == [{"rater": "tester", "ratings": N_PAIRS, "repeats": 0, "self_agreement": None}]
        assert 0.0 <= s["ai"]["agreement"] <= 1.0 and s["ai"]["judged"] == N_PAIRS
        text = scrape(cfg.server.metrics_port)
        assert metric_value(text, "rlhf_feedback_labels_by_source_total", {"source": "ai"}) == len(ai)
        assert metric_value(text, "rlhf_feedback_rate_choices_total", {"kind": "first"}) == N_PAIRS
    finally:
        shot = tmp_path / "rating-page.png"
        if driver is not None:
            driver.quit()
        keep = os.environ.get("RLHF_ARTIFACTS_DIR")
        if keep and shot.exists():
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / "rating-page.png")
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)

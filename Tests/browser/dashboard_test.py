"""The dashboard in a real browser (headless Chromium driven by Selenium), as an operator uses it.

Run by GatewayTests.theDashboardInABrowser with a bridge (events: all), aq-gateway and an HTTP
receiver running. Environment: GATEWAY_URL, TOKEN (an operator token), RECEIVER_URL (with /ok,
/flaky that refuses until /fix is called), SCREENSHOT (a path for a picture of the page; optional).
Exits 0 when every step passed; prints each step.
"""
import json
import os
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

GATEWAY = os.environ["GATEWAY_URL"]
TOKEN = os.environ["TOKEN"]
RECEIVER = os.environ["RECEIVER_URL"]


def step(text):
    print("ok:", text, flush=True)


def create_task(callback, task_id):
    request = urllib.request.Request(
        GATEWAY + "/v1/tasks", method="POST",
        data=json.dumps({"callbackUrl": callback, "payload": {"id": task_id}, "retries": 0}).encode(),
        headers={"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json", "Idempotency-Key": task_id})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202, response.status
        return json.load(response)["taskId"]


def main():
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(argument)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    wait = WebDriverWait(driver, 30, poll_frequency=0.2)
    try:
        # Signing in: the page asks for a token; a wrong one is refused.
        driver.get(GATEWAY + "/dashboard")
        wait.until(EC.presence_of_element_located((By.ID, "token"))).send_keys("not-a-token")
        driver.find_element(By.ID, "sign-in").click()
        wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "main"), "not an operator token"))
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "sign-in").click()
        wait.until(EC.presence_of_element_located((By.ID, "queues")))
        step("signed in; the work queues are listed")

        # A task appears and completes, live (the page refreshes itself).
        good = create_task(RECEIVER + "/ok", "browser-ok-1")
        wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, f'tr[data-task="{good}"] td.status'), "completed"))
        step("a task appeared and completed")

        # A task fails for good: it shows among the failures and in the dead letters.
        bad = create_task(RECEIVER + "/flaky", "browser-flaky-1")
        wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, f'tr[data-task="{bad}"] td.status'), "failed"))
        wait.until(EC.text_to_be_present_in_element((By.ID, "failures"), bad))
        step("a failing task shows as failed")
        if os.environ.get("SCREENSHOT"):
            driver.save_screenshot(os.environ["SCREENSHOT"])

        # The cause is fixed; the operator replays it by clicking, confirms, and it completes.
        urllib.request.urlopen(RECEIVER + "/fix", timeout=10).read()
        driver.get(GATEWAY + "/dashboard/dlq")
        row = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f'#letters tr[data-task="{bad}"]')))
        row.find_element(By.CSS_SELECTOR, "button.replay").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "confirm-text"), "Replay 1"))
        driver.find_element(By.ID, "confirm").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "result"), "Replayed 1"))
        step("the dead letter was replayed after a confirmation")
        driver.get(GATEWAY + "/dashboard")
        wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, f'tr[data-task="{bad}"] td.status'), "completed"))
        step("the replayed task completed")
        driver.get(GATEWAY + "/dashboard/dlq")
        wait.until(EC.presence_of_element_located((By.ID, "dlq-summary")))
        assert not driver.find_elements(By.CSS_SELECTOR, f'#letters tr[data-task="{bad}"]'), "the letter is gone"
        step("its dead letter is gone")
    except Exception as error:  # print the page to see why
        print("FAILED:", repr(error), file=sys.stderr)
        print(driver.page_source[:4000], file=sys.stderr)
        return 1
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())

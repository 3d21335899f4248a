"""minigpt studio in a real browser: build a model, train it, and chat with it (headless Chromium)."""

import copy
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("studio_browser")

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def studio(tmp_path):
    """The studio server on a free local port, in a thread; yields (url, app)."""
    from werkzeug.serving import make_server

    from minigpt.studio import create_app

    app = create_app(tmp_path / "runs", tmp_path / "uploads")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", app
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def browser():
    """Headless Chromium at 1400x900, driven by Selenium."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.skip(f"the browser test needs {' and '.join(missing)} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_window_size(1400, 900)
    try:
        yield driver
    finally:
        driver.quit()


def save_screenshot(driver, tmp_path, name):
    """Save the visible page to tmp_path, and also to $STUDIO_SCREENSHOTS when it is set."""
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("STUDIO_SCREENSHOTS"):
        folder = Path(os.environ["STUDIO_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def server_params(app, graph):
    """The parameter count the server gives for `graph`, formatted as the page shows it."""
    answer = app.test_client().post("/api/graph/summary", json=graph)
    assert answer.status_code == 200, answer.get_json()
    return f"{answer.get_json()['params']:,}"


def text_of(driver, element_id):
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def scroll_to(driver, element_id):
    driver.execute_script(f"document.getElementById('{element_id}').scrollIntoView({{block: 'center'}})")


def test_build_train_and_chat_in_the_browser(studio, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, app = studio
    driver = browser
    wait = WebDriverWait(driver, 20)
    presets = {p["name"]: p["graph"] for p in app.test_client().get("/api/presets").get_json()["presets"]}

    # 1. Load the gpt-mini preset: the page shows the server's parameter count.
    driver.get(url)
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    driver.find_element(By.CSS_SELECTOR, '[data-preset="gpt-mini"]').click()
    graph = copy.deepcopy(presets["gpt-mini"])
    expected = server_params(app, graph)
    wait.until(lambda d: text_of(d, "total-params") == expected)

    # 2. Change the number of transformer blocks in the side panel: the count follows the server.
    driver.find_element(By.CSS_SELECTOR, '.node[data-type="transformer_block"] .node-title').click()
    field = wait.until(lambda d: d.find_element(By.ID, "param-n_layers"))
    block = next(node for node in graph["nodes"] if node["type"] == "transformer_block")
    block["params"]["n_layers"] = int(field.get_attribute("value")) + 2
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(block["params"]["n_layers"]))
    changed = server_params(app, graph)
    assert changed != expected
    wait.until(lambda d: text_of(d, "total-params") == changed)

    # 3. A picture of the built model.
    save_screenshot(driver, tmp_path, "studio-model.png")

    # 4. Train the studio-tiny preset and watch the loss curve draw.
    driver.find_element(By.CSS_SELECTOR, '[data-preset="studio-tiny"]').click()
    expected = server_params(app, presets["studio-tiny"])
    wait.until(lambda d: text_of(d, "total-params") == expected)
    scroll_to(driver, "train-panel")
    driver.find_element(By.ID, "train-button").click()
    clicked = time.monotonic()
    chart = driver.find_element(By.ID, "loss-chart")
    WebDriverWait(driver, 60, poll_frequency=0.05).until(lambda d: int(chart.get_attribute("data-points")) >= 1)
    first_point = time.monotonic() - clicked
    print(f"train click to first point: {first_point:.2f} s")
    WebDriverWait(driver, 60).until(lambda d: int(chart.get_attribute("data-points")) >= 2)
    status = driver.find_element(By.ID, "run-status")
    WebDriverWait(driver, 60).until(lambda d: status.get_attribute("data-status") in ("finished", "stopped", "failed"))
    assert status.get_attribute("data-status") == "finished", status.text
    scroll_to(driver, "train-panel")
    save_screenshot(driver, tmp_path, "studio-training.png")

    # 5. Chat with the trained run: generated text streams into the output.
    run_id = status.get_attribute("data-run-id")
    select = driver.find_element(By.ID, "chat-model")
    wait.until(lambda d: run_id in [o.get_attribute("value") for o in Select(select).options])
    Select(select).select_by_value(run_id)
    prompt = driver.find_element(By.ID, "chat-prompt")
    prompt.clear()
    prompt.send_keys("Every effort")
    scroll_to(driver, "chat-panel")
    driver.find_element(By.ID, "chat-send").click()
    wait.until(lambda d: len(text_of(d, "chat-output")) > len("Every effort")
               and d.find_element(By.ID, "chat-send").is_enabled())
    assert text_of(driver, "chat-error") == ""
    save_screenshot(driver, tmp_path, "studio-chat.png")

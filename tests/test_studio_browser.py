"""minigpt studio in a real browser (headless Chromium): build a graph by dragging blocks and
wiring ports, save and place a template, import and export, train with a reload in the middle,
and fit a 1280x720 screen. Every number the page shows is compared with the server's own answer
for a graph the test builds itself."""

import copy
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("studio_browser")

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MOVE_MS = 40  # each pointer move of a drag (Selenium's default, 250 ms, makes a graph take seconds to wire)


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
def browser(tmp_path):
    """Headless Chromium at 1400x900, driven by Selenium; downloads go to tmp_path/downloads."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.skip(f"the browser test needs {' and '.join(missing)} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_window_size(1400, 900)
    (tmp_path / "downloads").mkdir()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path / "downloads")})
    try:
        yield driver
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------------
# Helpers: the server's answers, and what a user does with a mouse


def save_screenshot(driver, tmp_path, name):
    """Save the visible page to tmp_path, and also to $STUDIO_SCREENSHOTS when it is set."""
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("STUDIO_SCREENSHOTS"):
        folder = Path(os.environ["STUDIO_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def server_summary(app, graph):
    from minigpt.studio import CSRF_HEADER

    answer = app.test_client().post("/api/graph/summary", json=graph, headers={CSRF_HEADER: "1"})  # as the page sends it
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def server_params(app, graph):
    """The parameter count the server gives for `graph`, formatted as the page shows it."""
    return f"{server_summary(app, graph)['params']:,}"


def presets(app):
    return {p["name"]: p["graph"] for p in app.test_client().get("/api/presets").get_json()["presets"]}


def standard_chain():
    """The standard chain with every setting at its default, wired port to port: what a user builds
    from New by dragging the six missing blocks and connecting them in order."""
    from minigpt.graph import NODE_TYPES, STANDARD_CHAIN

    nodes = [{"id": kind, "type": kind, "x": 0, "y": 0, "params": {}} for kind in STANDARD_CHAIN]
    edges = [{"from": a, "from_port": NODE_TYPES[a]["outputs"][0]["name"],
              "to": b, "to_port": NODE_TYPES[b]["inputs"][0]["name"]} for a, b in zip(STANDARD_CHAIN, STANDARD_CHAIN[1:])]
    return {"version": 2, "name": "my-model", "nodes": nodes, "edges": edges, "templates": []}


def text_of(driver, element_id):
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def page_graph(driver):
    return driver.execute_script("return JSON.parse(JSON.stringify(state.graph))")


def open_studio(driver, url):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    WebDriverWait(driver, 20).until(lambda d: text_of(d, "total-params") not in ("", "–"))


def node_box(driver, node_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'.node[data-node-id="{node_id}"]')

def set_max_steps(driver, wait, steps):
    """Open the Training goal's settings and type its step limit, as a user would."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    node_box(driver, "training_goal").find_element(By.CLASS_NAME, "node-title").click()
    field = wait.until(lambda d: d.find_element(By.ID, "param-max_steps"))
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(steps))



def port(driver, node_id, direction, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'.node[data-node-id="{node_id}"] .port.{direction}[data-port="{name}"]')


def drag_from_palette(driver, css, x, y):
    """Drag a palette item and drop it at (x, y) of the canvas's visible area (zoom 1, no scroll)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    item = driver.find_element(By.CSS_SELECTOR, css)
    driver.execute_script("arguments[0].scrollIntoView({block: 'nearest'})", item)  # the palette scrolls, as for a user
    view = driver.find_element(By.ID, "canvas-wrap")
    width, height = view.size["width"], view.size["height"]
    (ActionChains(driver, duration=MOVE_MS).move_to_element(item).click_and_hold().move_by_offset(12, 4)
     .move_to_element_with_offset(view, x - width // 2, y - height // 2).release().perform())


def connect(driver, source, source_port, target, target_port):
    """Drag from an output port to an input port."""
    from selenium.webdriver.common.action_chains import ActionChains

    start, end = port(driver, source, "out", source_port), port(driver, target, "in", target_port)
    (ActionChains(driver, duration=MOVE_MS).move_to_element(start).click_and_hold().move_by_offset(10, 6)
     .move_to_element(end).release().perform())


def run_status(driver, run_id):
    """The status the runs list shows for a run (read at once: the list is redrawn as it polls)."""
    return driver.execute_script("const li = document.querySelector(`#runs-list li[data-run-id='${arguments[0]}']`); "
                                 "return li && li.dataset.status", run_id)


def drag_on_canvas(driver, start, end):
    """Press at canvas point `start` and release at `end` (the page's coordinates, before its zoom)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    to_screen = ("const r = document.getElementById('canvas').getBoundingClientRect(); "
                 "return [Math.round(r.left + arguments[0] * state.zoom), Math.round(r.top + arguments[1] * state.zoom)]")
    (x1, y1), (x2, y2) = (driver.execute_script(to_screen, *point) for point in (start, end))
    actions = ActionBuilder(driver, duration=MOVE_MS)
    (actions.pointer_action.move_to_location(x1, y1).pointer_down().move_to_location((x1 + x2) // 2, (y1 + y2) // 2)
     .move_to_location(x2, y2).pointer_up())
    actions.perform()


def edges_of(driver):
    return {(e["from"], e["from_port"], e["to"], e["to_port"]) for e in page_graph(driver)["edges"]}


def script_errors(driver):
    """Errors the page's JavaScript raised or logged (not the 400 answers it asked for and shows)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE" and entry["source"] != "network"]


# ---------------------------------------------------------------------------------------------
# Building a graph


def test_build_a_graph_by_dragging_blocks_and_wiring_ports(studio, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, app = studio
    driver, wait = browser, WebDriverWait(browser, 20, poll_frequency=0.1)
    open_studio(driver, url)

    # New: an empty canvas but for Data, Tokenizer and Training goal (the preset is unchanged: no question).
    driver.find_element(By.ID, "new-button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".node")) == 3)
    assert {n["type"] for n in page_graph(driver)["nodes"]} == {"data", "tokenizer", "training_goal"}
    check = driver.find_element(By.ID, "checkbar")
    wait.until(lambda d: "no loss" in check.text)  # it cannot train yet, and says why where the user looks

    # Drag the six missing blocks from the palette to where they are dropped.
    drops = {"token_embedding": (300, 30), "positional_encoding": (300, 130), "transformer_block": (300, 230),
             "norm": (300, 330), "output_head": (560, 30), "next_token_loss": (560, 130)}
    for kind, (x, y) in drops.items():
        drag_from_palette(driver, f'.palette-item[data-type="{kind}"]', x, y)
        wait.until(lambda d: any(n["type"] == kind for n in page_graph(d)["nodes"]))
    placed = {n["type"]: n for n in page_graph(driver)["nodes"]}
    for kind, (x, y) in drops.items():  # dropped where released (the item's grip point, 20 x 12 px in)
        assert abs(placed[kind]["x"] - (x - 20)) <= 3 and abs(placed[kind]["y"] - (y - 12)) <= 3, placed[kind]

    # Wire them port to port by dragging; the summary then equals the server's for the same chain.
    expected = standard_chain()
    for edge in expected["edges"]:
        connect(driver, edge["from"], edge["from_port"], edge["to"], edge["to_port"])
    assert edges_of(driver) == {(e["from"], e["from_port"], e["to"], e["to_port"]) for e in expected["edges"]}
    params = server_params(app, expected)
    wait.until(lambda d: text_of(d, "total-params") == params)
    assert check.get_attribute("data-state") == "ok" and params in check.text
    shapes = driver.execute_script("return [...document.querySelectorAll('.edges text')].map(t => t.textContent)")
    assert "B x T x 128" in shapes and "B x T x 50257" in shapes  # each edge labelled with its shape

    # A port of the wrong kind is refused with a message; an input already fed asks before replacing.
    connect(driver, "tokenizer", "ids", "norm", "in")
    toast = driver.find_element(By.ID, "toast")
    wait.until(lambda d: toast.is_displayed() and "Cannot connect" in toast.text)
    assert "token ids" in toast.text and len(edges_of(driver)) == 8
    connect(driver, "token_embedding", "out", "norm", "in")
    wait.until(lambda d: "Replace that connection?" in toast.text)
    toast.find_element(By.XPATH, ".//button[text()='Keep it']").click()
    assert edges_of(driver) == {(e["from"], e["from_port"], e["to"], e["to_port"]) for e in expected["edges"]}
    assert text_of(driver, "total-params") == params
    save_screenshot(driver, tmp_path, "flow-build.png")


def test_errors_show_on_the_node_and_port_they_name(studio, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, app = studio
    driver, wait = browser, WebDriverWait(browser, 20, poll_frequency=0.1)
    open_studio(driver, url)
    # Click the edge into the norm and press Delete: the server then says to connect the norm's
    # input, on that node and port.
    driver.find_element(By.CSS_SELECTOR, '.edges g[data-to="norm"] path.hit').click()
    assert driver.execute_script("return state.selectedEdge.to") == "norm"
    ActionChains(driver).send_keys(Keys.DELETE).perform()
    wait.until(lambda d: not any(e["to"] == "norm" for e in page_graph(d)["edges"]))
    box = node_box(driver, "norm")
    wait.until(lambda d: "has-error" in box.get_attribute("class"))
    assert "connect" in box.find_element(By.CLASS_NAME, "node-error").text
    assert "port-error" in port(driver, "norm", "in", "in").get_attribute("class")
    assert "1 problem: norm: connect" in driver.find_element(By.ID, "checkbar").text


def test_delete_key_only_deletes_from_the_canvas_and_undo_restores(studio, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = studio
    driver, wait = browser, WebDriverWait(browser, 20, poll_frequency=0.1)
    open_studio(driver, url)
    count = len(page_graph(driver)["nodes"])
    node_box(driver, "token_embedding").find_element(By.CLASS_NAME, "node-title").click()
    field = wait.until(lambda d: d.find_element(By.ID, "param-emb_dim"))
    field.send_keys(Keys.BACKSPACE, Keys.DELETE)  # typing in a field edits the field, not the graph
    assert len(page_graph(driver)["nodes"]) == count

    node_box(driver, "token_embedding").find_element(By.CLASS_NAME, "node-title").click()
    driver.find_element(By.ID, "config-button").click()  # a dialog, closed with the keyboard
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    ActionChains(driver).send_keys(Keys.DELETE).perform()
    assert len(page_graph(driver)["nodes"]) == count

    node_box(driver, "token_embedding").find_element(By.CLASS_NAME, "node-title").click()
    ActionChains(driver).send_keys(Keys.DELETE).perform()
    wait.until(lambda d: len(page_graph(d)["nodes"]) == count - 1)
    ActionChains(driver).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()
    wait.until(lambda d: len(page_graph(d)["nodes"]) == count)
    assert any(e["to"] == "token_embedding" for e in page_graph(driver)["edges"])  # its edges came back too
    driver.find_element(By.ID, "redo-button").click()
    wait.until(lambda d: len(page_graph(d)["nodes"]) == count - 1)


# ---------------------------------------------------------------------------------------------
# Templates


def test_save_a_selection_as_a_template_and_place_it_repeated_twice(studio, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, app = studio
    driver, wait = browser, WebDriverWait(browser, 20, poll_frequency=0.1)
    graph = copy.deepcopy(presets(app)["studio-tiny"])
    before = server_summary(app, graph)
    pair_params = sum(n["params"] for n in before["per_node"] if n["node"] in ("transformer_block", "norm"))
    open_studio(driver, url)
    wait.until(lambda d: text_of(d, "total-params") == f"{before['params']:,}")

    # Draw a box around the GPT block and the norm after it: the page infers the template's input
    # (the node an edge from outside comes into) and output (the node an edge leaves from).
    at = {n["id"]: (n["x"], n["y"]) for n in page_graph(driver)["nodes"]}
    top, bottom = at["transformer_block"][1] - 10, at["output_head"][1] - 20
    drag_on_canvas(driver, (at["norm"][0] + 290, top), (at["transformer_block"][0] - 30, bottom))
    wait.until(lambda d: d.execute_script("return [...state.selection].sort()") == ["norm", "transformer_block"])
    assert Select(driver.find_element(By.ID, "template-input")).first_selected_option.get_attribute("value") == "transformer_block"
    assert Select(driver.find_element(By.ID, "template-output")).first_selected_option.get_attribute("value") == "norm"
    name = driver.find_element(By.ID, "template-name")
    name.send_keys(Keys.CONTROL, "a")
    name.send_keys("pair")
    driver.find_element(By.ID, "template-save").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.palette-item[data-template="pair"]'))

    # Place it from the palette, repeat it twice, and wire it in between the norm and the output head.
    drag_from_palette(driver, '.palette-item[data-template="pair"]', 620, 460)
    wait.until(lambda d: any(n["type"] == "template" for n in page_graph(d)["nodes"]))
    repeat = wait.until(lambda d: d.find_element(By.ID, "param-repeat"))
    repeat.send_keys(Keys.CONTROL, "a")
    repeat.send_keys("2")
    connect(driver, "norm", "out", "template-pair", "in")
    connect(driver, "template-pair", "out", "output_head", "in")
    toast = driver.find_element(By.ID, "toast")
    wait.until(lambda d: "Replace that connection?" in toast.text)
    toast.find_element(By.XPATH, ".//button[text()='Replace']").click()

    # The same graph, built here: the count grows by twice the template's parameters.
    inner = [copy.deepcopy(n) for n in graph["nodes"] if n["id"] in ("transformer_block", "norm")]
    graph["templates"] = [{"name": "pair", "nodes": inner, "input": "transformer_block", "output": "norm",
                           "edges": [e for e in graph["edges"] if e["from"] == "transformer_block"]}]
    graph["nodes"].append({"id": "template-pair", "type": "template", "x": 0, "y": 0,
                           "params": {"template": "pair", "repeat": 2}})
    graph["edges"] = [e for e in graph["edges"] if e["from"] != "norm"]
    graph["edges"] += [{"from": "norm", "from_port": "out", "to": "template-pair", "to_port": "in"},
                       {"from": "template-pair", "from_port": "out", "to": "output_head", "to_port": "in"}]
    after = server_summary(app, graph)
    assert after["params"] == before["params"] + 2 * pair_params
    wait.until(lambda d: text_of(d, "total-params") == f"{after['params']:,}")
    saved = page_graph(driver)["templates"]
    assert [(t["name"], t["input"], t["output"], len(t["nodes"]), len(t["edges"])) for t in saved] == \
        [("pair", "transformer_block", "norm", 2, 1)]
    assert "pair × 2" in node_box(driver, "template-pair").text
    save_screenshot(driver, tmp_path, "flow-template.png")


# ---------------------------------------------------------------------------------------------
# Import and export


def test_import_and_export_round_trip_and_a_bad_file_says_why(studio, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, app = studio
    driver, wait = browser, WebDriverWait(browser, 20, poll_frequency=0.1)
    graph = app.test_client().get("/api/example").get_json()
    graph["name"] = "my encoder-decoder"
    graph["templates"] = [{"name": "mlp", "nodes": [{"id": "ff", "type": "feed_forward", "x": 0, "y": 0,
                                                     "params": {"ffn": "swiglu", "ffn_hidden": None, "bias": False}}],
                           "edges": [], "input": "ff", "output": "ff"}]
    source = tmp_path / "example.json"
    source.write_text(json.dumps(graph, indent=2))
    open_studio(driver, url)
    driver.find_element(By.ID, "example-button").click()  # the README's first step
    wait.until(lambda d: d.find_element(By.ID, "graph-name").get_attribute("value") == "encoder-decoder example")

    driver.find_element(By.ID, "import-file").send_keys(str(source))
    wait.until(lambda d: d.find_element(By.ID, "graph-name").get_attribute("value") == graph["name"])
    wait.until(lambda d: text_of(d, "total-params") == server_params(app, graph))
    assert driver.find_element(By.CSS_SELECTOR, '.palette-item[data-template="mlp"]')
    node_box(driver, "decoder").find_element(By.CLASS_NAME, "node-title").click()
    save_screenshot(driver, tmp_path, "studio-model.png")  # the appendix's first figure

    driver.find_element(By.ID, "export-button").click()
    exported = tmp_path / "downloads" / "my-encoder-decoder.json"
    wait.until(lambda d: exported.is_file() and exported.stat().st_size > 0)
    time.sleep(0.2)
    assert json.loads(exported.read_text()) == graph

    # Not the standard chain: no config_run.py settings, but the command that trains the exported file.
    driver.find_element(By.ID, "config-button").click()
    dialog = driver.find_element(By.ID, "config-dialog")
    wait.until(lambda d: dialog.is_displayed())
    assert "standard chain only" in dialog.text
    assert "python main.py --graph my-encoder-decoder.json" in text_of(driver, "config-command")
    dialog.find_element(By.CSS_SELECTOR, "form button").click()
    driver.find_element(By.ID, "script-button").click()
    script = tmp_path / "downloads" / "my-encoder-decoder.py"
    wait.until(lambda d: script.is_file() and script.stat().st_size > 0)
    time.sleep(0.2)
    compile(script.read_text(), str(script), "exec")  # a Python script

    for name, content, words in (("null.json", "null", "holds null"), ("broken.json", "{\"nodes\": [", "not valid JSON"),
                                 ("list.json", "[1, 2]", "holds a list")):
        bad = tmp_path / name
        bad.write_text(content)
        driver.find_element(By.ID, "import-file").send_keys(str(bad))
        banner = driver.find_element(By.ID, "banner")
        wait.until(lambda d: banner.is_displayed() and name in banner.text)
        assert words in banner.text
        assert driver.execute_script("const r = arguments[0].getBoundingClientRect(); return r.top >= 0 && r.bottom <= innerHeight", banner)
    assert page_graph(driver)["name"] == graph["name"]  # the graph on the canvas is untouched
    assert script_errors(driver) == []
    save_screenshot(driver, tmp_path, "flow-import-export.png")


# ---------------------------------------------------------------------------------------------
# Training: reload, stop and resume from the page


def test_training_survives_a_reload_and_stops_and_resumes_from_the_page(studio, browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from minigpt.studio import StudioRun

    # Hold the run at its third step until the page has reloaded and asked it to stop: the test then
    # never races a run that finishes first, however fast or slow the machine.
    gate, emit = threading.Event(), StudioRun.emit

    def held_emit(self, event):
        emit(self, event)
        if event.get("type") == "step" and event.get("step") == 3:
            gate.wait(timeout=60)

    monkeypatch.setattr(StudioRun, "emit", held_emit)
    url, app = studio
    driver, wait = browser, WebDriverWait(browser, 30, poll_frequency=0.1)
    open_studio(driver, url)
    set_max_steps(driver, wait, 20)

    driver.find_element(By.ID, "train-button").click()
    chart = driver.find_element(By.ID, "loss-chart")
    wait.until(lambda d: int(chart.get_attribute("data-points")) >= 3)
    run_id = driver.find_element(By.ID, "run-status").get_attribute("data-run-id")
    assert run_id == "studio-tiny-1"

    # Reload: the run is listed, still training, and its curve is drawn again from its events.
    driver.refresh()
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    wait.until(lambda d: run_status(d, run_id) == "running")
    chart = driver.find_element(By.ID, "loss-chart")
    wait.until(lambda d: int(chart.get_attribute("data-points")) >= 3)
    assert "loss" in text_of(driver, "train-log") and "ppl" in text_of(driver, "train-log")

    # A second Train is refused while it trains, and says which run to stop.
    driver.find_element(By.ID, "train-button").click()
    busy = driver.find_element(By.ID, "busy")
    wait.until(lambda d: busy.is_displayed() and run_id in busy.text)
    assert busy.find_element(By.XPATH, f".//button[text()='Stop {run_id}']").is_displayed()
    busy.find_element(By.XPATH, ".//button[text()='Close']").click()

    # Stop from the page (the held step then ends, and the run saves its checkpoint), then resume.
    driver.find_element(By.ID, "stop-button").click()
    gate.set()
    wait.until(lambda d: run_status(d, run_id) == "stopped")
    resume = driver.find_element(By.ID, "resume-button")
    wait.until(lambda d: resume.is_enabled())
    resume.click()
    status = driver.find_element(By.ID, "run-status")
    wait.until(lambda d: status.get_attribute("data-status") == "finished")
    wait.until(lambda d: run_status(d, run_id) == "finished")
    assert not driver.find_element(By.ID, "resume-button").is_enabled()  # a finished run has nothing to resume
    assert driver.execute_script(f"return document.querySelector('#runs-list li[data-run-id=\"{run_id}\"] .run-resume').disabled")
    assert int(chart.get_attribute("data-points")) >= 19
    metrics = json.loads((tmp_path / "runs" / run_id / "metrics.json").read_text())
    assert f"{round(metrics['tokens_per_sec']):,} tokens/s" in text_of(driver, "tokens-per-sec")
    save_screenshot(driver, tmp_path, "flow-reload-resume.png")


def test_train_and_chat_with_the_trained_run(studio, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, _ = studio
    driver, wait = browser, WebDriverWait(browser, 60, poll_frequency=0.1)
    open_studio(driver, url)
    set_max_steps(driver, wait, 12)
    driver.find_element(By.ID, "train-button").click()
    status = driver.find_element(By.ID, "run-status")
    wait.until(lambda d: status.get_attribute("data-status") in ("finished", "stopped", "failed"))
    assert status.get_attribute("data-status") == "finished", status.text
    chart = driver.find_element(By.ID, "loss-chart")
    assert int(chart.get_attribute("data-points")) == 12
    assert "val" in text_of(driver, "train-log")  # the evaluation at step 10 is logged with its perplexity

    run_id = status.get_attribute("data-run-id")
    driver.find_element(By.ID, "tab-button-chat").click()
    select = driver.find_element(By.ID, "chat-model")
    wait.until(lambda d: run_id in [o.get_attribute("value") for o in Select(select).options])
    Select(select).select_by_value(run_id)
    prompt = driver.find_element(By.ID, "chat-prompt")
    prompt.clear()
    prompt.send_keys("I had")
    driver.find_element(By.ID, "chat-send").click()
    wait.until(lambda d: len(text_of(d, "chat-output")) > len("I had") and d.find_element(By.ID, "chat-send").is_enabled())
    assert text_of(driver, "chat-error") == ""
    save_screenshot(driver, tmp_path, "studio-chat.png")


# ---------------------------------------------------------------------------------------------
# Layout


def test_train_button_is_in_view_at_1280x720(studio, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = studio
    driver = browser
    driver.set_window_size(1280, 720)
    inner = driver.execute_script("return [innerWidth, innerHeight]")
    driver.set_window_size(1280 + 1280 - inner[0], 720 + 720 - inner[1])  # a 1280x720 viewport
    open_studio(driver, url)
    assert driver.execute_script("return [innerWidth, innerHeight]") == [1280, 720]
    button = driver.find_element(By.ID, "train-button")
    assert button.is_displayed()
    assert driver.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                 "return r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth",
                                 button)
    assert driver.execute_script("return document.scrollingElement.scrollHeight <= innerHeight")
    save_screenshot(driver, tmp_path, "flow-1280x720.png")

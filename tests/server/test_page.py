"""The model page in a real headless Chromium: it lists the loaded versions with
their cards, and a real PNG from the example test set dropped on it shows the
same top label and OOD flag as a gRPC Classify of the same file.

``TLSERVE_SCREENSHOT=docs/http-page.png pytest tests/server/test_page.py``
(after ``make demo``) saves the page serving the demo's model, as
``docs/http-page.png`` was made."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.http_calls import build_http_repository
from tests.support import ServerThread, free_port
from tlserve.client import Client

ROOT = Path(__file__).resolve().parents[2]
IMAGE = sorted((ROOT / "examples" / "fashion-mnist" / "test" / "sneaker").glob("*.png"))[0]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

# Drops the file the test put in a plain file input onto the page's drop zone,
# as a person dragging it from their file manager does.
_DROP = """
const input = document.getElementById("test-file");
input.hidden = true;
const file = input.files[0];
const data = new DataTransfer();
data.items.add(file);
const zone = document.getElementById("drop");
for (const kind of ["dragenter", "dragover", "drop"]) {
  zone.dispatchEvent(new DragEvent(kind, {dataTransfer: data, bubbles: true, cancelable: true}));
}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if BROWSER is None or DRIVER is None:
        pytest.skip(
            "no chromium and chromedriver on PATH (make test installs them: "
            "apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1100,960"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("page") / "models"
    build_http_repository(repo)
    running = ServerThread(repo, http_port=free_port())
    yield running
    running.stop()


def _drop(driver: object, image: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script(  # type: ignore[attr-defined]
        "const i = document.createElement('input'); i.type = 'file'; i.id = 'test-file';"
        "document.body.appendChild(i);"
    )
    driver.find_element(By.ID, "test-file").send_keys(str(image))  # type: ignore[attr-defined]
    driver.execute_script(_DROP)  # type: ignore[attr-defined]
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "answer").is_displayed())


@pytest.mark.slow
def test_a_dropped_png_shows_grpcs_top_label_and_ood_flag(
    browser: object, server: ServerThread
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    driver: object = browser
    with Client(server.target) as client:
        [expected] = client.classify([IMAGE.read_bytes()], model="watched", top_k=5)
    driver.get(server.http_url + "/")  # type: ignore[attr-defined]
    wait = WebDriverWait(driver, 20)
    wait.until(lambda d: d.find_element(By.ID, "try").is_displayed())
    cards = {c.get_attribute("data-model"): c.text for c in
             driver.find_elements(By.CSS_SELECTOR, "#models .card")}  # type: ignore[attr-defined]  # fmt: skip
    assert set(cards) == {"tiny", "watched"}
    assert "held-out accuracy\n90.0%" in cards["watched"]
    assert "variant served\nfloat32" in cards["watched"] and "training report" in cards["watched"]
    assert "OOD threshold\nnone" in cards["tiny"] and "OOD threshold\n4." in cards["watched"]
    chips = driver.find_elements(By.CSS_SELECTOR, "[data-model=watched] .chips span")  # type: ignore[attr-defined]
    assert [c.text for c in chips] == ["red", "green", "blue"]
    Select(driver.find_element(By.ID, "model")).select_by_visible_text(  # type: ignore[attr-defined]
        "watched (version 1)"
    )
    _drop(driver, IMAGE)
    top = driver.find_element(By.ID, "top-label").text  # type: ignore[attr-defined]
    flag = driver.find_element(By.ID, "ood-flag").text  # type: ignore[attr-defined]
    assert top == expected[0].label
    assert flag == ("yes" if expected.out_of_distribution else "no")
    rows = driver.find_elements(By.CSS_SELECTOR, "#scores tbody tr")  # type: ignore[attr-defined]
    assert len(rows) == len(expected) == 3 and driver.find_element(By.ID, "error").text == ""  # type: ignore[attr-defined]
    # The training report link opens the rendered report with its figure.
    driver.find_element(By.LINK_TEXT, "training report").click()  # type: ignore[attr-defined]
    wait.until(lambda d: d.find_elements(By.TAG_NAME, "table"))
    figure = driver.find_element(By.CSS_SELECTOR, "img[alt=confusion]")  # type: ignore[attr-defined]
    assert (
        driver.execute_script(  # type: ignore[attr-defined]
            "return arguments[0].complete && arguments[0].naturalWidth", figure
        )
        == 40
    )


DEMO_MODELS = ROOT / "build" / "demo" / "models"


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("TLSERVE_SCREENSHOT") or not DEMO_MODELS.is_dir(),
    reason="makes docs/http-page.png: set TLSERVE_SCREENSHOT after `make demo`",
)
def test_screenshot_of_the_page_serving_the_demo_model(browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    running = ServerThread(DEMO_MODELS, http_port=free_port())
    try:
        driver: object = browser
        driver.get(running.http_url + "/")  # type: ignore[attr-defined]
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "try").is_displayed())
        _drop(driver, IMAGE)
        driver.save_screenshot(os.environ["TLSERVE_SCREENSHOT"])  # type: ignore[attr-defined]
    finally:
        running.stop()

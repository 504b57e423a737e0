"""The demo page in a real browser (headless Chromium through Selenium) against a real TorchServe
that allows only the page's origin (CORS): real Fashion-MNIST test images, the answers compared
with the endpoint's own, the server's error message for a bad file, and a screenshot."""

from __future__ import annotations

import io
import json
import shutil

import harness
import numpy as np
import pytest
from PIL import Image

import demo.server as demo
from handlers.image import open_image, to_pixels
from handlers.store import served as served_archives

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.slow]
MODELS = ["fmnist", "fmnist-torchscript"]


@pytest.fixture(scope="module")
def page(exported, tmp_path_factory):
    """(the page's URL, the TorchServe behind it): the server allows exactly the page's origin."""
    _, model_store = exported
    port = harness.free_ports(1)[0]
    origin = demo.origin("127.0.0.1", port)
    server = harness.start(model_store, tmp_path_factory.mktemp("torchserve-demo"), MODELS,
                           extra_config=f"cors_allowed_origin={origin}")
    site = demo.start("127.0.0.1", port, server.inference, server.management)
    yield f"{origin}/", server
    demo.stop(site)
    server.stop()


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("headless Chromium needs Debian's chromium and chromium-driver packages "
                    "(make test installs them where apt and root are available)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: run make venv")
    options = webdriver.ChromeOptions()
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(argument)
    options.binary_location = chromium
    session = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    yield session
    session.quit()


def body_attribute(browser, name: str) -> str | None:
    return browser.execute_script(f"return document.body.dataset.{name} ?? null")


def wait_for(browser, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda _: condition(), message=what)


def open_page(browser, url: str) -> None:
    browser.get(url)
    wait_for(browser, lambda: body_attribute(browser, "ready") == "yes", "the page to connect")


def upload(browser, path) -> None:
    """Chooses `path` in the page's file input and waits for the page to show the server's answer."""
    from selenium.webdriver.common.by import By

    answers = int(body_attribute(browser, "answers") or 0)
    browser.find_element(By.ID, "file").send_keys(str(path))
    wait_for(browser, lambda: int(body_attribute(browser, "answers") or 0) == answers + 1, f"an answer for {path}")


def shown_bars(browser) -> list[tuple[str, float, str]]:
    """(class name, exact probability the page holds, the percentage it shows) per bar, top first."""
    return browser.execute_script(
        "return [...document.querySelectorAll('#bars li')].map(li => "
        "[li.dataset.label, Number(li.dataset.probability), li.querySelector('.value').textContent])")


def model_view(browser) -> np.ndarray:
    """The page's "as the model sees it" canvas as uint8 (height, width, RGB)."""
    width, height, data = browser.execute_script(
        "const c = document.getElementById('model-view');"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]")
    return np.array(data, dtype=np.uint8).reshape(height, width, 4)[:, :, :3]


def test_the_page_lists_the_models_and_shows_what_the_endpoint_answers(page, browser, served_images, exported,
                                                                       tmp_path):
    from selenium.webdriver.common.by import By

    url, server = page
    images, _, class_names = served_images
    open_page(browser, url)
    served = sorted(served_archives(exported[1]))  # with -int8 where export wrote it
    assert body_attribute(browser, "models").split(",") == served  # from the management API's /models
    assert body_attribute(browser, "model") == "fmnist" and body_attribute(browser, "spec") == "yes"
    info = browser.find_element(By.ID, "model-info").text
    assert "fashion-mnist" in info and "28×28, grey" in info and class_names[9] in info  # the model's metadata

    image = tmp_path / "test-image-0.png"
    image.write_bytes(images[0])
    upload(browser, image)
    assert body_attribute(browser, "state") == "done"
    status, answer, _ = server.predict("fmnist", images[0])
    assert status == 200
    assert browser.find_element(By.ID, "top-label").text == answer["label"]
    bars = shown_bars(browser)
    assert [name for name, _, _ in bars] == sorted(class_names, key=lambda n: -answer["probabilities"][n])
    for name, probability, text in bars:
        assert abs(probability - answer["probabilities"][name]) <= 1e-6, name
        assert text == f"{answer['probabilities'][name] * 100:.2f} %", name
    # A 28x28 grey test image is what the model sees, pixel for pixel.
    view = model_view(browser)
    assert view.shape == (28, 28, 3)
    assert (view == np.asarray(Image.open(io.BytesIO(images[0])))[:, :, None]).all()
    screenshot = tmp_path / "demo.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:4] == b"\x89PNG"
    print(f"screenshot: {screenshot}")


def test_the_preview_resizes_and_greys_as_the_server_does(page, browser, served_images, tmp_path):
    """A colour 70x84 picture previews to the pixels handlers/image.py gives the model."""
    url, server = page
    images, _, _ = served_images
    grey = Image.open(io.BytesIO(images[5]))
    colour = Image.merge("RGB", [grey, grey.point(lambda v: v // 2), grey.point(lambda v: 255 - v)])
    colour = colour.resize((70, 84), Image.Resampling.BICUBIC)
    path = tmp_path / "colour.png"
    colour.save(path)
    open_page(browser, url)
    upload(browser, path)
    expected = to_pixels(open_image(path.read_bytes(), 10**7), 1, 28, 28, (0, 0, 0))[0]
    view = model_view(browser)[:, :, 0]
    assert np.abs(view.astype(int) - expected).max() == 0
    status, answer, _ = server.predict("fmnist", path.read_bytes())
    assert status == 200 and shown_bars(browser)[0][0] == answer["label"]


def test_a_bad_file_shows_the_servers_error_message(page, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, server = page
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"%PDF-1.4 this is not a picture")
    open_page(browser, url)
    upload(browser, bad)
    assert body_attribute(browser, "state") == "error"
    status, answer, _ = server.predict("fmnist", bad.read_bytes())
    assert status == 400
    shown = browser.find_element(By.ID, "error").text
    assert shown == f"400: {answer['error']}", shown
    assert "not an image" in shown
    assert not browser.find_element(By.ID, "prediction").is_displayed()
    browser.save_screenshot(str(tmp_path / "demo-error.png"))


def test_a_page_from_another_origin_cannot_read_the_server(page, browser):
    """CORS allows the demo's own origin only: the same page served elsewhere gets no answers."""
    from selenium.webdriver.common.by import By

    _, server = page
    other = demo.start("127.0.0.1", 0, server.inference, server.management)
    try:
        open_page(browser, f"http://127.0.0.1:{other.server_address[1]}/")
        assert body_attribute(browser, "models") == ""
        assert "cannot list the models" in browser.find_element(By.ID, "server-status").text
    finally:
        demo.stop(other)
    status, body, headers = harness.http("GET", f"{server.management}/models")
    assert status == 200 and json.loads(body)["models"]  # the server itself is fine
    allowed = {key.lower(): value for key, value in headers.items()}["access-control-allow-origin"]
    assert allowed == demo.origin("127.0.0.1", int(page[0].rsplit(":", 1)[1].strip("/")))

"""The search page in a real browser: Debian's headless Chromium, driven by Playwright, types a query and submits it.

Skips, saying why, when Playwright is not installed or Chromium is missing or cannot start (`.ci/run` installs
Debian's `chromium` package when it can). Playwright downloads no browser here: it drives the system binary.
"""
import os

import pytest
from app_server import APP, MISSING_KEYS, NUM_IMAGES, AppServer, saved_collection
from PIL import Image
from transformers import AutoModel, AutoTokenizer

CHROMIUM = os.environ.get("GCMR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUERY = "a red circle to the left of a blue square"
# Ask for every image, so the page shows both thumbnails and the placeholders of the images the folder lacks.
TOP_K = NUM_IMAGES


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    """A persistent context on a fresh --user-data-dir (Playwright's way to pass one), or a skip with the reason."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[dev]'")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium) "
                    "or set GCMR_CHROMIUM")
    playwright = sync_api.sync_playwright().start()
    try:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1200, "height": 900},
        )
    except Exception as error:  # noqa: BLE001  (any launch failure means this machine cannot run the test)
        playwright.stop()
        pytest.skip(f"Chromium at {CHROMIUM} could not be launched: {str(error).splitlines()[0]}")
    yield context
    context.close()
    playwright.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, text_tokenizer):
    folder = tmp_path_factory.mktemp("app-browser")
    checkpoint, images = saved_collection(folder, text_tokenizer)
    server = AppServer(APP, ["--retriever", str(checkpoint), "--images", str(images)], folder / "server.log")
    yield server, checkpoint
    server.stop()


def test_a_query_typed_in_the_browser_shows_the_thumbnails_of_retrieve(browser_context, server, tmp_path):
    app, checkpoint = server
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    expected = [key for key, _ in model.retrieve([QUERY], tokenizer, top_k=TOP_K)[0]]

    page = browser_context.new_page()
    outside = []
    page.on("request", lambda request: outside.append(request.url)
            if not request.url.startswith((app.url, "data:", "blob:")) else None)
    page.goto(app.url)
    page.fill("#top-k input[type=number]", str(TOP_K))
    page.press("#top-k input[type=number]", "Enter")
    page.fill("#query textarea", QUERY)
    page.press("#query textarea", "Enter")  # submit, as a user would
    page.wait_for_selector(f"#text-results figure[data-rank='{TOP_K}']", timeout=30_000)

    cards = page.eval_on_selector_all(
        "#text-results figure",
        """cards => cards.map(card => {
            const img = card.querySelector('img.gcmr-thumb');
            return {key: card.dataset.key, loaded: img ? img.complete && img.naturalWidth > 0 : null,
                    identifier: card.querySelector('.gcmr-id').innerText};
        })""",
    )
    assert [card["key"] for card in cards] == expected
    for card in cards:
        # A decoded thumbnail for each image the folder has, and no <img> for the missing ones (a placeholder).
        assert card["loaded"] is (None if card["key"] in MISSING_KEYS else True), card
        assert card["identifier"].split("›")[0].strip().startswith("<c_")
    assert page.locator("#text-results img.gcmr-thumb").count() == NUM_IMAGES - len(MISSING_KEYS)
    assert page.locator("#text-results .gcmr-missing").count() == len(MISSING_KEYS)
    assert page.inner_text("#missing-images").count("syn_") == len(MISSING_KEYS)

    screenshot = tmp_path / "search_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.width == 1200 and image.height > 600
    assert outside == [], f"the page fetched from outside the server: {outside}"
    assert app.alive()

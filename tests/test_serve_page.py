"""The web chat page (minimind/assets/chat.html) driven in a real browser: Playwright with Debian's chromium
(`apt-get install chromium fonts-wqy-microhei`; .ci/run installs both) against the real server. Type, send, watch
the reply stream in, see errors from the server in the page, start a new chat; a minimind-3 model's thinking
collapsed above its answer; Chinese renders with a CJK font (distinct glyphs, not the same tofu box for every
character)."""
import os
import subprocess

import pytest
from playwright.sync_api import expect, sync_playwright

from minimind.generate import SamplingConfig, chat
from tests.ci import skip_unless_ci
from tests.scripted_model import minimind3_tokenizer, scripted_model
from tests.serve_helpers import QUESTION, running_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000

# Each character drawn alone on a canvas in the page's font, as a string of ink bits. Tofu is one box for every
# missing character, so distinct characters with identical bits (or no ink) did not render.
GLYPH_BITS = """([text, selector]) => {
  const canvas = document.createElement("canvas"), g = canvas.getContext("2d");
  canvas.width = canvas.height = 64;
  g.font = "48px " + getComputedStyle(document.querySelector(selector)).fontFamily;
  return Array.from(text).map(ch => {
    g.clearRect(0, 0, 64, 64);
    g.fillText(ch, 4, 52);
    const alpha = g.getImageData(0, 0, 64, 64).data;
    let bits = "";
    for (let i = 3; i < alpha.length; i += 4) bits += alpha[i] > 127 ? "1" : "0";
    return bits;
  });
}"""


def glyphs_render(page, text, selector="body"):
    bits = page.evaluate(GLYPH_BITS, [text, selector])
    return len(set(bits)) == len(bits) and all("1" in b for b in bits)


@pytest.fixture(scope="module")
def playwright():
    if not os.path.exists(CHROMIUM):
        skip_unless_ci(f"{CHROMIUM} is missing: apt-get install chromium fonts-wqy-microhei (.ci/run does)")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


def reply_done(page):
    expect(page.locator("#send")).to_be_enabled(timeout=TIMEOUT_MS)


def ask(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")
    reply_done(page)


def test_the_page_chats_streams_shows_errors_and_starts_over(browser):
    with running_server(api_key="sekrit") as srv:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(srv.url + "/")
        expect(page.locator("#key_label")).to_be_visible()  # /v1/models answered 401: the key field appears
        page.fill("#temperature", "0")

        ask(page, QUESTION[0]["content"])
        expect(page.locator(".msg.error")).to_contain_text("API key")

        page.fill("#api_key", "sekrit")
        page.dispatch_event("#api_key", "change")
        expect(page.locator("#model")).to_have_text("tiny")
        expect(page.locator("#think_label")).to_be_hidden()  # MiniMind2's format cannot think
        page.evaluate("""() => { window.updates = 0; new MutationObserver(records => window.updates += records.length)
                         .observe(document.getElementById("log"), {subtree: true, childList: true}); }""")
        ask(page, QUESTION[0]["content"])
        want = chat(srv.model, srv.tokenizer, QUESTION, max_new_tokens=8, temperature=0.0)
        assert page.locator(".msg.assistant").last.evaluate("e => e.textContent") == want
        assert page.locator(".msg.user").last.evaluate("e => e.textContent") == QUESTION[0]["content"]
        # the reply arrived piece by piece: the user's bubble, the reply's, then one update per piece
        assert page.evaluate("window.updates") >= 2 + 3

        page.fill("#temperature", "5")
        ask(page, "again")
        expect(page.locator(".msg.error").last).to_contain_text("temperature")

        assert page.locator(".msg").count() == 6
        page.click("#reset")
        expect(page.locator(".msg")).to_have_count(0)
        page.fill("#temperature", "0")
        ask(page, QUESTION[0]["content"])
        assert page.locator(".msg.assistant").last.evaluate("e => e.textContent") == want  # history 0: same
        page.close()


def test_the_thinking_shows_collapsed_under_the_answer(browser):
    """A minimind-3 model: the think switch appears and is sent; the reasoning arrives in a collapsed "Thinking"
    section under the answer, which opens on a click; it goes back with the answer in the history."""
    tok = minimind3_tokenizer()
    model = scripted_model(tok, "Let me see.\n2 + 3 = 5.\n</think>\n\nIt is 5.", "Five again.")
    question = [{"role": "user", "content": "What is 2 + 3?"}]

    def prompt(messages, thinking):
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking))
    with running_server(model, tok, sampling=SamplingConfig(max_new_tokens=100)) as srv:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(srv.url + "/")
        expect(page.locator("#think_label")).to_be_visible()
        page.check("#think")
        page.fill("#history", "1")
        ask(page, question[0]["content"])
        bubble = page.locator(".msg.assistant").last
        details = bubble.locator("details.thinking")
        expect(details.locator("summary")).to_have_text("Thinking")
        assert details.evaluate("e => e.open") is False and bubble.evaluate("e => e.lastElementChild.tagName") \
            == "DETAILS"  # collapsed, under the answer
        expect(details.locator(".reasoning")).to_be_hidden()
        assert bubble.locator(".answer").evaluate("e => e.textContent") == "It is 5."
        details.locator("summary").click()
        expect(details.locator(".reasoning")).to_be_visible()
        assert details.locator(".reasoning").evaluate("e => e.textContent") == "Let me see.\n2 + 3 = 5."
        assert model.prompts[0] == prompt(question, thinking=True)

        page.uncheck("#think")
        ask(page, "Again?")
        bubble = page.locator(".msg.assistant").last
        assert bubble.locator(".answer").evaluate("e => e.textContent") == "Five again."
        assert bubble.locator("details").count() == 0
        earlier = question + [{"role": "assistant", "content": "It is 5.",
                               "reasoning_content": "Let me see.\n2 + 3 = 5."}, {"role": "user", "content": "Again?"}]
        assert model.prompts[1] == prompt(earlier, thinking=False)
        page.close()


def zh_font_families():
    out = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True, check=True).stdout
    return {name.strip() for line in out.splitlines() for name in line.split(",") if name.strip()}


def test_chinese_renders_with_a_cjk_font(browser):
    families = zh_font_families()
    assert families, "no font covers Chinese: apt-get install fonts-wqy-microhei (.ci/run does)"
    with running_server() as srv:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(srv.url + "/")
        ask(page, "你好，世界")
        bubble = page.locator(".msg.user").last
        expect(bubble).to_have_text("你好，世界")
        cdp = page.context.new_cdp_session(page)
        cdp.send("DOM.enable")
        cdp.send("CSS.enable")
        root = cdp.send("DOM.getDocument")["root"]["nodeId"]
        node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": ".msg.user"})["nodeId"]
        used = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
        assert any(f["familyName"] in families and f["glyphCount"] >= 4 for f in used), (used, families)
        assert glyphs_render(page, "你好世界", ".msg.user")
        page.close()


def test_the_glyph_check_sees_tofu_without_a_cjk_font(playwright, tmp_path):
    """The check above can fail: a browser whose fontconfig knows no CJK font draws the same box for each."""
    (tmp_path / "fonts.conf").write_text(
        '<?xml version="1.0"?><!DOCTYPE fontconfig SYSTEM "fonts.dtd"><fontconfig>'
        f"<dir>/usr/share/fonts/truetype/dejavu</dir><cachedir>{tmp_path}/cache</cachedir></fontconfig>")
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                         env={**os.environ, "FONTCONFIG_FILE": str(tmp_path / "fonts.conf")})
    try:
        page = browser.new_page()
        page.set_content("<body style='font-family: system-ui, sans-serif'>x</body>")
        assert glyphs_render(page, "abcd")
        assert not glyphs_render(page, "你好世界")
    finally:
        browser.close()

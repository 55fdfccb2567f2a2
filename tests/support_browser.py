"""A headless Chromium driven over the Chrome DevTools Protocol (CDP), for tests of the HTML pages.

No playwright/selenium: one websocket (websocket-client) to the browser, with the page attached as a
flattened session, so browser-level downloads and page commands share it.

    with HeadlessBrowser(downloads=tmp_path / "downloads") as browser:
        browser.open(page.as_uri())
        browser.evaluate("document.title")
        browser.click("#download")
        saved = browser.wait_for_download()
    assert not browser.errors  # uncaught exceptions, console.error and error log entries

Chromium comes from PATH (`chromium`, as Debian names it, or a Chrome); without one a test skips,
or fails where FLUXLORA_REQUIRE_BROWSER=1 (CI, which installs it: .ci/install-browser).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import websocket

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT = 30.0


def chromium() -> str:
    """The browser's path, or a skip (a failure where FLUXLORA_REQUIRE_BROWSER=1) naming how to get it."""
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    message = ("no headless browser: none of " + ", ".join(BROWSER_NAMES) + " is on PATH; "
               "`bash .ci/install-browser` (run by .ci/run) installs Debian's chromium")
    if os.environ.get("FLUXLORA_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


class BrowserError(AssertionError):
    pass


class HeadlessBrowser:
    """One headless Chromium with one page; a context manager that always ends the browser."""

    def __init__(self, downloads: Path, executable: str | None = None, width: int = 1280, height: int = 800):
        self.downloads = Path(downloads)
        self.executable = executable or chromium()
        self.size = (width, height)
        self.events: list[dict] = []
        self.errors: list[str] = []
        self._next_id = 0
        self._methods: dict[int, str] = {}
        self._replies: dict[int, dict] = {}
        self._process: subprocess.Popen | None = None
        self._log = None
        self._profile: tempfile.TemporaryDirectory | None = None
        self._ws: websocket.WebSocket | None = None
        self._session = ""

    # -- lifetime ------------------------------------------------------------------------------
    def __enter__(self) -> HeadlessBrowser:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self.downloads.mkdir(parents=True, exist_ok=True)
        self._profile = tempfile.TemporaryDirectory(prefix="fluxlora-chromium-")
        profile = Path(self._profile.name)
        self._log = open(profile / "stderr.log", "wb")  # noqa: SIM115 - closed in close()
        self._process = subprocess.Popen(
            [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: close() ends the renderers and helpers too
        )
        # Chromium writes the port it bound (port 0: a free one) and the browser target's path here.
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT
        while not (active.exists() and len(active.read_text().splitlines()) >= 2):
            if self._process.poll() is not None:
                raise BrowserError(f"chromium exited with {self._process.returncode}: {self._stderr_tail()}")
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium wrote no DevToolsActivePort in {TIMEOUT:.0f} s: {self._stderr_tail()}")
            time.sleep(0.05)
        port, path = active.read_text().splitlines()[:2]
        self._ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=TIMEOUT,
                                               suppress_origin=True)

        self.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(self.downloads),
                                                  "eventsEnabled": True})
        [page] = [t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        self._session = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.page(f"{domain}.enable")

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except (OSError, websocket.WebSocketException):
                pass
            self._ws = None
        if self._process is not None:
            try:  # the whole group, even when the browser itself has gone: its helpers may not have
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._process.wait(timeout=TIMEOUT)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None

    def _stderr_tail(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_bytes()[-2000:].decode(errors="replace")

    # -- the protocol --------------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, session: str = "") -> dict:
        """A CDP command to the browser (or to `session`); its result, or BrowserError with its error."""
        return self.result(self.post(method, params, session))

    def post(self, method: str, params: dict | None = None, session: str = "") -> int:
        """Send a command without waiting (for one that waits on something the test does next): its id."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        self._methods[self._next_id] = method
        return self._next_id

    def result(self, command: int) -> dict:
        """The result of a posted command, waiting for it; BrowserError with its error."""
        deadline = time.monotonic() + TIMEOUT
        while command not in self._replies:
            self._receive(deadline, f"no reply to {self._methods[command]}")
        reply = self._replies.pop(command)
        if "error" in reply:
            raise BrowserError(f"{self._methods[command]}: {reply['error']}")
        return reply.get("result", {})

    def page(self, method: str, params: dict | None = None) -> dict:
        return self.send(method, params, self._session)

    def post_page(self, method: str, params: dict | None = None) -> int:
        return self.post(method, params, self._session)

    def _receive(self, deadline: float, what: str) -> dict:
        """The next message; events are recorded (and errors among them collected) on the way."""
        self._ws.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = json.loads(self._ws.recv())
        except websocket.WebSocketTimeoutException:
            raise BrowserError(f"{what} in {TIMEOUT:.0f} s") from None
        if "method" in message:
            self.events.append(message)
            self._collect_error(message)
        elif "id" in message:
            self._replies[message["id"]] = message
        return message

    def _collect_error(self, event: dict) -> None:
        params = event.get("params", {})
        if event["method"] == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"{params['entry'].get('url', '')}: {params['entry']['text']}")

    def wait_for_event(self, method: str, match: Callable[[dict], bool] = lambda params: True) -> dict:
        """The params of the first event `method` (seen already or still to come) that `match`es."""
        seen = 0
        deadline = time.monotonic() + TIMEOUT
        while True:
            for event in self.events[seen:]:
                if event["method"] == method and match(event.get("params", {})):
                    return event["params"]
            seen = len(self.events)
            self._receive(deadline, f"no {method} event")

    # -- what a test does with the page --------------------------------------------------------
    def open(self, url: str) -> None:
        """Load `url` and wait for its load event."""
        self.events.clear()
        frame = self.page("Page.navigate", {"url": url})
        if frame.get("errorText"):
            raise BrowserError(f"cannot open {url}: {frame['errorText']}")
        self.wait_for_event("Page.loadEventFired")

    def leave(self, url: str = "about:blank") -> bool:
        """Navigate away as a person would: True when the page asked first (a beforeunload prompt,
        answered "stay", so the page stays as it was); False when it let the browser go."""
        command = self.post_page("Page.navigate", {"url": url})
        seen = len(self.events)
        deadline = time.monotonic() + TIMEOUT
        while command not in self._replies:  # Page.navigate answers only once a prompt is answered
            if any(e["method"] == "Page.javascriptDialogOpening" for e in self.events[seen:]):
                self.page("Page.handleJavaScriptDialog", {"accept": False})
                self.result(command)
                return True
            self._receive(deadline, f"no reply to Page.navigate({url})")
        self.result(command)
        return False

    def evaluate(self, expression: str):
        """A JavaScript expression's value in the page (promises awaited); BrowserError if it throws."""
        result = self.page("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True, "userGesture": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press + release) in the middle of the element, scrolled into view first."""
        box = self.evaluate(f"""(() => {{
            const element = document.querySelector({json.dumps(selector)});
            if (!element) throw new Error("nothing matches " + {json.dumps(selector)});
            element.scrollIntoView({{block: "center"}});
            const r = element.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2];
        }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})

    def type_into(self, selector: str, text: str) -> None:
        """As a person replaces a field's text: click into it, select all (Ctrl+A), type `text`."""
        self.click(selector)
        if not self.evaluate(f"document.activeElement === document.querySelector({json.dumps(selector)})"):
            raise BrowserError(f"clicking {selector} did not focus it")
        for kind in ("rawKeyDown", "keyUp"):
            self.page("Input.dispatchKeyEvent", {"type": kind, "key": "a", "code": "KeyA", "modifiers": 2,
                                                 "windowsVirtualKeyCode": 65, "commands": ["selectAll"]})
        self.page("Input.insertText", {"text": text})

    def wait_for_download(self) -> Path:
        """The next download, once complete: its file in `downloads` (named as the page named it)."""
        begun = self.wait_for_event("Browser.downloadWillBegin")
        done = self.wait_for_event("Browser.downloadProgress",
                                   lambda p: p["guid"] == begun["guid"] and p["state"] in ("completed", "canceled"))
        if done["state"] != "completed":
            raise BrowserError(f"download of {begun['suggestedFilename']} was canceled")
        # filePath: where it went (Chromium adds " (1)" when the name is taken); older ones leave it out
        return Path(done.get("filePath") or self.downloads / begun["suggestedFilename"])

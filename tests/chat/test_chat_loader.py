"""The loader script and the integration page: escaping, globals, and (with node) behaviour."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.chat.loader import (
    SETTINGS_PLACEHOLDER,
    loader_source,
    render_loader,
    render_page,
    script_json,
)

HOSTILE = '"</script><img src=x onerror=alert(1)>'
SETTINGS: dict[str, object] = {
    "contextPath": "/service-cloud",
    "mode": "authorization",
    "configId": "202011230001",
    "tenantSpaceId": "202007159031",
    "locale": "zh",
    "mapService": "tencent",
    "userId": "guest-0123456789abcdef0123",
    "userName": HOSTILE,
    "token": None,
    "cobrowse": False,
}
NODE = shutil.which("node")


def embedded_settings(js: str) -> Any:
    """The settings object as the loader carries it (between `var settings = ` and `;`)."""
    m = re.search(r"var settings = (.*?);\n", js)
    assert m is not None
    return json.loads(m.group(1))


def test_script_json_escapes_breakouts() -> None:
    text = script_json({"a": "</script><!--&\u2028\u2029'\"", "b": "张三"})
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    assert "\\u003c/script\\u003e" in text
    assert json.loads(text) == {"a": "</script><!--&\u2028\u2029'\"", "b": "张三"}
    assert text.isascii()


def test_loader_embeds_hostile_name_only_json_escaped() -> None:
    js = render_loader(SETTINGS).decode("utf-8")
    assert HOSTILE not in js
    assert "</script" not in js.lower()
    assert "<img" not in js
    assert "\\u003c/script\\u003e\\u003cimg src=x onerror=alert(1)\\u003e" in js
    assert embedded_settings(js) == SETTINGS
    assert SETTINGS_PLACEHOLDER not in js


def test_loader_template_has_one_placeholder() -> None:
    assert loader_source().count(SETTINGS_PLACEHOLDER) == 1


def test_loader_defines_all_globals_without_dependencies() -> None:
    js = render_loader(SETTINGS).decode("utf-8")
    for name in (
        "$ContextPath", "$aicc_ContextPath", "thirdUserData", "importScript", "thirdValidate",
        "configId", "userId", "userName", "tenantSpaceId", "locale", "token",
    ):
        assert f"window.{name} = " in js, name
    for dep in ("jQuery", "$.ajax", "axios"):
        assert dep not in js
    assert "newThirdPartyClient.js" in js and "thirdPartyClient.js" in js
    assert "resource.root/cobrowse/sdk/cobrowse.js" in js and "cobrowseCommon.js" in js
    # ES5 only, so that Internet Explorer can parse it and be warned.
    assert "=>" not in js
    assert not re.search(r"\b(const|let|class)\s", js)
    assert "`" not in js


def test_page_escapes_values_and_has_one_loader_tag() -> None:
    page = render_page(SETTINGS, loader_path="/gateway/chat.js?v=1&x=\"y\"").decode("utf-8")
    assert HOSTILE not in page
    assert "<img" not in page
    assert html.escape(HOSTILE) in page
    assert page.count("<script") == 1
    assert '<script src="/gateway/chat.js?v=1&amp;x=&quot;y&quot;" defer></script>' in page
    assert "202011230001" in page and "202007159031" in page
    assert page.startswith("<!DOCTYPE html>")
    assert 'lang="zh-CN"' in page


def test_page_title_escaped_and_token_hidden() -> None:
    page = render_page(
        {**SETTINGS, "token": "tok-secret", "extra": "<b>"}, loader_path="/l.js", title="<i>T</i>"
    ).decode()
    assert "<i>T</i>" not in page and "&lt;i&gt;T&lt;/i&gt;" in page
    assert "tok-secret" not in page
    assert "&lt;b&gt;" in page


# ---------------------------------------------------------------- running the loader in node

HARNESS = r"""
const vm = require("vm");
const fs = require("fs");
const src = fs.readFileSync(process.argv[2], "utf8");
const scenario = JSON.parse(process.argv[3]);
const out = { fetches: [], appended: [], logs: [], delays: [], ran: [] };
let answers = scenario.answers.slice();

function element(tag) {
  return { tagName: tag, src: "", text: "", type: "", async: true };
}
const head = {
  appendChild(el) {
    out.appended.push(el.src ? { src: el.src } : { text: el.text });
    if (el.src) { setImmediate(() => el.onload && el.onload()); }
    else if (el.text) { vm.runInContext(el.text, ctx); }
  }
};
const document = {
  readyState: "complete",
  head,
  documentMode: scenario.documentMode,
  createElement: element,
  getElementsByTagName() { return [head]; },
  addEventListener() {}
};
const ctx = {
  location: { protocol: "https:", host: "shop.example" },
  navigator: { userAgent: scenario.userAgent || "Mozilla/5.0 (X11; Linux x86_64) Firefox/120" },
  console: {
    debug: (...a) => out.logs.push(["debug", a.join(" ")]),
    warn: (...a) => out.logs.push(["warn", a.join(" ")]),
    log: (...a) => out.logs.push(["log", a.join(" ")]),
    error: (...a) => out.logs.push(["error", a.join(" ")])
  },
  setTimeout(fn, ms) { out.delays.push(ms); setImmediate(fn); return 1; },
  fetch(url, opts) {
    out.fetches.push({ url, method: opts.method, credentials: opts.credentials,
                       headers: opts.headers, body: JSON.parse(opts.body) });
    const a = answers.length ? answers.shift() : { status: 200, text: "" };
    if (a.error) { return Promise.reject(new TypeError(a.error)); }
    return Promise.resolve({ status: a.status, text: () => Promise.resolve(a.text) });
  },
  record(x) { out.ran.push(x); }
};
ctx.window = ctx;
ctx.document = document;
vm.createContext(ctx);
for (let i = 0; i < (scenario.times || 1); i++) { vm.runInContext(src, ctx); }
process.on("beforeExit", () => {
  if (out.done) { return; }
  out.done = true;
  const g = {};
  for (const k of ["$ContextPath", "$aicc_ContextPath", "configId", "userId", "userName",
                   "tenantSpaceId", "locale", "token", "thirdUserData"]) { g[k] = ctx[k]; }
  g.importScript = typeof ctx.importScript;
  g.thirdValidate = typeof ctx.thirdValidate;
  out.globals = g;
  process.stdout.write(JSON.stringify(out));
});
"""


def run_loader(tmp_path: Path, settings: dict[str, object], **scenario: Any) -> Any:
    if NODE is None:
        pytest.skip("node is not on PATH")
    js = tmp_path / "chat.js"
    js.write_bytes(render_loader(settings))
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    scenario.setdefault("answers", [])
    proc = subprocess.run(
        [NODE, str(harness), str(js), json.dumps(scenario)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_node_authorization_mode(tmp_path: Path) -> None:
    out = run_loader(
        tmp_path, SETTINGS, answers=[{"status": 200, "text": "record('chat script ran')"}]
    )
    g = out["globals"]
    assert g["$ContextPath"] == "https://shop.example/service-cloud"
    assert g["$aicc_ContextPath"] == "https://shop.example/service-cloud"
    assert g["userName"] == HOSTILE  # stays data, exactly
    assert g["userId"] == SETTINGS["userId"]
    assert g["configId"] == "202011230001"
    assert g["tenantSpaceId"] == "202007159031"
    assert g["locale"] == "zh"
    assert g["token"] is None
    assert g["importScript"] == "function" and g["thirdValidate"] == "function"
    assert len(out["fetches"]) == 1
    f = out["fetches"][0]
    assert re.fullmatch(
        r"https://shop\.example/service-cloud/webclient/chat_client/js/"
        r"newThirdPartyClient\.js\?&t=\d{13}",
        f["url"],
    )
    assert f["method"] == "POST" and f["credentials"] == "same-origin"
    body = f["body"]
    assert body["thirdUserName"] == HOSTILE
    assert body["thirdUserId"] == SETTINGS["userId"]
    assert body["tenantSpaceId"] == "202007159031"
    assert body["channelConfigId"] == "202011230001"
    assert body["locale"] == "zh" and body["mapService"] == "tencent"
    assert isinstance(body["timestamp"], int)
    assert "secretKey" not in body and "thirdPartAuthorization" not in body
    assert out["ran"] == ["chat script ran"]
    assert g["thirdUserData"]["thirdUserName"] == HOSTILE


def test_node_retries_with_backoff_silently(tmp_path: Path) -> None:
    out = run_loader(
        tmp_path, SETTINGS,
        answers=[{"error": "offline"}, {"status": 502, "text": "bad"},
                 {"status": 503, "text": ""}, {"status": 200, "text": "record('ok')"}],
    )
    assert len(out["fetches"]) == 4
    assert out["delays"] == [1000, 2000, 4000]
    assert out["ran"] == ["ok"]
    assert all(level == "debug" for level, _ in out["logs"])


def test_node_gives_up_after_max_tries(tmp_path: Path) -> None:
    out = run_loader(tmp_path, SETTINGS, answers=[{"error": "offline"}] * 20)
    assert len(out["fetches"]) == 6
    assert out["delays"] == [1000, 2000, 4000, 8000, 16000]
    assert out["ran"] == []
    assert out["logs"] and all(level == "debug" for level, _ in out["logs"])
    assert not any(a.get("text") for a in out["appended"])


def test_node_no_retry_on_4xx(tmp_path: Path) -> None:
    out = run_loader(tmp_path, SETTINGS, answers=[{"status": 400, "text": "record('no')"}])
    assert len(out["fetches"]) == 1
    assert out["ran"] == [] and out["delays"] == []


def test_node_backoff_is_capped(tmp_path: Path) -> None:
    # The cap is visible in the source: 1 s doubling, 30 s at most.
    js = render_loader(SETTINGS).decode()
    assert "MAX_DELAY_MS = 30000" in js and "FIRST_DELAY_MS = 1000" in js


@pytest.mark.parametrize(
    "scenario",
    [
        {"userAgent": "Mozilla/5.0 (Windows NT 10.0; Trident/7.0; rv:11.0) like Gecko"},
        {"userAgent": "Mozilla/4.0 (compatible; MSIE 8.0; Windows NT 6.1)"},
        {"documentMode": 11},
    ],
)
def test_node_internet_explorer_warns_once_and_stops(tmp_path: Path, scenario: Any) -> None:
    out = run_loader(tmp_path, SETTINGS, times=2, **scenario)
    assert out["fetches"] == []
    warnings = [m for level, m in out["logs"] if level == "warn"]
    assert len(warnings) == 1 and "Internet Explorer" in warnings[0]
    assert out["globals"]["importScript"] == "undefined"


def test_node_loaded_twice_runs_once(tmp_path: Path) -> None:
    out = run_loader(tmp_path, SETTINGS, times=2,
                     answers=[{"status": 200, "text": "record(1)"}] * 2)
    assert len(out["fetches"]) == 1


def test_node_token_mode(tmp_path: Path) -> None:
    settings = {**SETTINGS, "mode": "token", "token": None}
    out = run_loader(
        tmp_path, settings,
        answers=[
            # The CEC's thirdPartyClient.js answer calls thirdValidate itself.
            {"status": 200, "text": "record('client'); thirdValidate(thirdUserData);"},
            {"status": 200, "text": "record('new client')"},
        ],
    )
    urls = [f["url"] for f in out["fetches"]]
    assert "/js/thirdPartyClient.js?&t=" in urls[0]
    assert "/js/newThirdPartyClient.js?&t=" in urls[1]
    assert out["ran"] == ["client", "new client"]
    assert out["fetches"][1]["body"]["thirdUserId"] == SETTINGS["userId"]


def test_node_cobrowse_scripts_first(tmp_path: Path) -> None:
    out = run_loader(tmp_path, {**SETTINGS, "cobrowse": True},
                     answers=[{"status": 200, "text": "record('ok')"}])
    srcs = [a["src"] for a in out["appended"] if "src" in a]
    assert srcs == [
        "https://shop.example/service-cloud/resource.root/cobrowse/sdk/cobrowse.js",
        "https://shop.example/service-cloud/webclient/chat_client/js/cobrowseCommon.js",
    ]
    assert out["appended"][0] == {"src": srcs[0]}
    assert out["ran"] == ["ok"]
    assert len(out["fetches"]) == 1


def test_node_token_mode_anonymous_stays_off(tmp_path: Path) -> None:
    out = run_loader(tmp_path, {**SETTINGS, "mode": "token", "userId": None, "userName": None})
    assert out["fetches"] == []
    assert all(level == "debug" for level, _ in out["logs"])

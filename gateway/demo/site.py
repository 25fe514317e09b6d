"""The sample enterprise site of ``gateway demo``: what sits behind the gateway's ``/`` route.

- ``/`` and ``/products``: ordinary pages that include the chat with the gateway's one tag
  (``<script src="/gateway/chat.js" defer></script>``);
- ``/login`` (a fake login: any name, no password) sets a session cookie ``sid``; ``/logout``;
- ``/api/me``: ``{"userId", "userName"}`` for a logged-in ``sid``, else 401. The gateway calls
  it server-side with the visitor's cookies (``cec.identity.source: url``);
- ``/api/status``: a small JSON answer (the end-to-end tests fetch it cross-origin for CORS);
- ``/guide-demo.html``: an integration page written the way the vendor's guide writes its
  authorization-mode demo (globals, ``thirdUserData``, ``importScript``, a POST to
  ``newThirdPartyClient.js``), with ``$ContextPath`` pointed at the gateway and no secret in it:
  the gateway signs that POST on its way to the CEC.

Everything a user typed is HTML-escaped on the way out; the guide page takes its display name
from the query string (``?name=``) in JavaScript and never writes it into markup.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger("gateway.demo.site")

SESSION_COOKIE = "sid"
MAX_SESSIONS = 10_000
MAX_NAME_LENGTH = 64


@dataclass(frozen=True)
class SiteUser:
    """A logged-in visitor of the sample site."""

    user_id: str
    user_name: str


@dataclass(frozen=True)
class SiteSettings:
    """What the pages need to know about the chat (all public values, no secret)."""

    loader_path: str = "/gateway/chat.js"
    context_path: str = "/service-cloud"
    tenant_space_id: str = "202007159031"
    channel_config_id: str = "202011230001"
    locale: str = "en"


class Sessions:
    """``sid`` → user, in memory, bounded (the oldest sessions go first)."""

    def __init__(self, max_entries: int = MAX_SESSIONS) -> None:
        self._items: OrderedDict[str, SiteUser] = OrderedDict()
        self._max = max_entries

    def __repr__(self) -> str:
        # Session ids are credentials: never in a repr.
        return f"Sessions(count={len(self._items)})"

    def create(self, user: SiteUser) -> str:
        sid = secrets.token_urlsafe(24)
        self._items[sid] = user
        while len(self._items) > self._max:
            self._items.popitem(last=False)
        return sid

    def get(self, sid: str | None) -> SiteUser | None:
        return self._items.get(sid) if sid else None

    def drop(self, sid: str | None) -> None:
        if sid:
            self._items.pop(sid, None)


SESSIONS_KEY = web.AppKey("demo.sessions", Sessions)
SITE_SETTINGS_KEY = web.AppKey("demo.site_settings", SiteSettings)


def user_id_for(name: str) -> str:
    """A stable user id for a login name (the same name gets the same id, as on a real site)."""
    return "user-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]


def _current_user(request: web.Request) -> SiteUser | None:
    return request.app[SESSIONS_KEY].get(request.cookies.get(SESSION_COOKIE))


_STYLE = """
  body { font-family: system-ui, sans-serif; margin: 0; color: #1f2933; background: #f5f7fa; }
  header { background: #243b53; color: #fff; padding: .8rem 2rem; display: flex;
           align-items: center; gap: 1.5rem; flex-wrap: wrap; }
  header a { color: #d9e2ec; text-decoration: none; }
  header a:hover { color: #fff; }
  header .brand { font-weight: 700; font-size: 1.1rem; color: #fff; }
  header .user { margin-left: auto; display: flex; gap: .6rem; align-items: center; }
  header form { margin: 0; }
  main { max-width: 48rem; margin: 2rem auto; padding: 0 1rem; }
  .card { background: #fff; border-radius: 8px; padding: 1.2rem 1.5rem; margin-bottom: 1rem;
          box-shadow: 0 1px 3px rgba(0,0,0,.08); }
  label { display: block; margin: .6rem 0; }
  input[type=text] { padding: .4rem; width: 18rem; max-width: 100%; }
  button { padding: .4rem .9rem; cursor: pointer; }
  code { background: #eef2f7; padding: .1rem .3rem; border-radius: 3px; }
"""


def _page(request: web.Request, title: str, body: str, *, loader: bool = True) -> web.Response:
    """A full page: header with the login state, ``body`` (trusted markup), the loader tag."""
    settings = request.app[SITE_SETTINGS_KEY]
    user = _current_user(request)
    if user is None:
        who = '<a id="site-login-link" href="/login">Log in</a>'
    else:
        who = (f'<span id="site-user">Signed in as {html.escape(user.user_name)}</span>'
               '<form method="post" action="/logout">'
               '<button id="site-logout" type="submit">Log out</button></form>')
    tag = (f'<script src="{html.escape(settings.loader_path, quote=True)}" defer></script>'
           if loader else "")
    text = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} · Example Corp</title>
<link rel="icon" href="data:,">
<style>{_STYLE}</style>
</head>
<body>
<header>
  <a class="brand" href="/">Example Corp</a>
  <a href="/">Home</a>
  <a href="/products">Products</a>
  <a href="/guide-demo.html">Guide-style page</a>
  <span class="user">{who}</span>
</header>
<main>
{body}
</main>
{tag}
</body>
</html>
"""
    resp = web.Response(text=text, content_type="text/html", charset="utf-8")
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def home(request: web.Request) -> web.Response:
    settings = request.app[SITE_SETTINGS_KEY]
    body = f"""<div class="card">
<h1>Welcome to Example Corp</h1>
<p>This is a sample enterprise site behind the CEC chat gateway. The round button at the
bottom right is the customer-service chat: this page includes it with one tag,
<code>&lt;script src="{html.escape(settings.loader_path)}" defer&gt;&lt;/script&gt;</code>.</p>
<p>Log in (any name) to chat as a known customer, or chat as a guest.</p>
</div>
<div class="card">
<h2>Try it</h2>
<ol>
<li>Open the agent console (<code>{html.escape(settings.context_path)}/agent/</code>) in
another window, sign in as <code>agent1</code> / <code>agent1</code> and go idle.</li>
<li>Open the chat here and write a message.</li>
</ol>
</div>"""
    return _page(request, "Home", body)


async def products(request: web.Request) -> web.Response:
    body = """<div class="card">
<h1>Products</h1>
<ul>
<li>Widget Pro: a widget for professionals.</li>
<li>Widget Lite: the same widget, lighter.</li>
<li>Support plans: ask us in the chat.</li>
</ul>
</div>"""
    return _page(request, "Products", body)


async def login_form(request: web.Request) -> web.Response:
    body = f"""<div class="card">
<h1>Log in</h1>
<p>A fake login for the demo: any name, no password.</p>
<form method="post" action="/login">
<label>Your name <input type="text" id="site-login-name" name="name" required
  maxlength="{MAX_NAME_LENGTH}" autocomplete="name"></label>
<button id="site-login-submit" type="submit">Log in</button>
</form>
</div>"""
    return _page(request, "Log in", body, loader=False)


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    raw = form.get("name")
    name = raw.strip()[:MAX_NAME_LENGTH] if isinstance(raw, str) else ""
    if not name:
        raise web.HTTPSeeOther("/login")
    sessions = request.app[SESSIONS_KEY]
    sessions.drop(request.cookies.get(SESSION_COOKIE))
    sid = sessions.create(SiteUser(user_id_for(name), name))
    resp = web.HTTPSeeOther("/")
    resp.set_cookie(SESSION_COOKIE, sid, path="/", httponly=True, samesite="Lax",
                    secure=True if request.secure else None)
    log.info("demo login")
    raise resp


async def logout(request: web.Request) -> web.Response:
    request.app[SESSIONS_KEY].drop(request.cookies.get(SESSION_COOKIE))
    resp = web.HTTPSeeOther("/")
    resp.del_cookie(SESSION_COOKIE, path="/")
    raise resp


async def me(request: web.Request) -> web.Response:
    user = _current_user(request)
    if user is None:
        return web.json_response({"error": "not logged in"}, status=401,
                                 headers={"Cache-Control": "no-store"})
    return web.json_response({"userId": user.user_id, "userName": user.user_name},
                             headers={"Cache-Control": "no-store"})


async def status(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "site": "Example Corp"})


def _js(value: object) -> str:
    """A JSON literal safe inside an inline ``<script>``."""
    text = json.dumps(value, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


async def guide_demo(request: web.Request) -> web.Response:
    """The vendor guide's authorization-mode page, pointed at the gateway, without a secret."""
    s = request.app[SITE_SETTINGS_KEY]
    text = f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>Guide-style integration page</title>
<link rel="icon" href="data:,">
<style>{_STYLE}</style>
</head>
<body>
<header><a class="brand" href="/">Example Corp</a><a href="/">Home</a></header>
<main><div class="card">
<h1>Integration page in the style of the vendor's guide</h1>
<p>This page builds <code>thirdUserData</code> and POSTs it to
<code>newThirdPartyClient.js</code> itself, as the guide's authorization-mode demo does. It
carries no <code>secretKey</code> and no signature: the gateway signs the request.</p>
</div></main>
<script>
    // 1. Variables the chat window needs (the guide's table 2-7).
    const params = new URLSearchParams(window.location.search);
    const userId = "guide-visitor";                       // the gateway replaces it
    const userName = params.get("name") || "Guide visitor";
    const tenantSpaceId = {_js(s.tenant_space_id)};
    const configId = {_js(s.channel_config_id)};
    const locale = {_js(s.locale)};
    // Pointed at the gateway (this page's own origin), not at the CEC.
    const $ContextPath = window.location.protocol + "//" + window.location.host
        + {_js(s.context_path)};
    const $aicc_ContextPath = $ContextPath;

    // 2. The request parameters. No secretKey here: the gateway signs server-side.
    let serviceUrl = $ContextPath + "/webclient/chat_client/js/newThirdPartyClient.js?&t="
        + new Date().getTime();
    let thirdUserData = {{}};
    thirdUserData['thirdUserName'] = userName;
    thirdUserData['thirdUserId'] = userId;
    thirdUserData['tenantSpaceId'] = tenantSpaceId;
    thirdUserData['channelConfigId'] = configId;
    thirdUserData['locale'] = locale;
    thirdUserData['mapService'] = 'tencent';
    thirdUserData['timestamp'] = new Date().getTime();

    // 5. Runs the returned script text in a script element (defined before the request).
    var importScript = (function (oHead) {{
        function loadError(oError) {{
            throw new URIError("The script " + oError.target.src + " is not accessible.");
        }}
        return function (sSrc, fOnload) {{
            var oScript = document.createElement("script");
            oScript.type = "text/javascript";
            oScript.onerror = loadError;
            if (fOnload) {{ oScript.onload = fOnload; }}
            oHead.appendChild(oScript);
            oScript.text = sSrc;
        }};
    }})(document.head || document.getElementsByTagName("body")[0]);

    // thirdPartyClient.js (token mode) continues with this function.
    function thirdValidate(data) {{
        data.timestamp = new Date().getTime();
        postClient($ContextPath + "/webclient/chat_client/js/newThirdPartyClient.js?&t="
            + new Date().getTime(), data);
    }}

    // 3. Request newThirdPartyClient.js (the guide uses $.ajax; plain XHR does the same).
    function postClient(url, data) {{
        var request = new XMLHttpRequest();
        request.open("POST", url);
        request.withCredentials = true;
        request.setRequestHeader("Content-Type", "application/json;charset=UTF-8");
        request.onload = function () {{
            if (request.status >= 200 && request.status < 300) {{
                // 4. Run the returned newThirdPartyClient.js.
                importScript(request.responseText);
            }} else {{
                console.log("unauthorized, validate failed", request.status);
            }}
        }};
        request.send(JSON.stringify(data));
    }}
    postClient(serviceUrl, thirdUserData);
</script>
</body>
</html>
"""
    resp = web.Response(text=text, content_type="text/html", charset="utf-8")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def create_site_app(settings: SiteSettings | None = None) -> web.Application:
    """The sample site as an aiohttp application."""
    app = web.Application(client_max_size=16 * 1024)
    app[SESSIONS_KEY] = Sessions()
    app[SITE_SETTINGS_KEY] = settings or SiteSettings()
    r = app.router
    r.add_get("/", home)
    r.add_get("/products", products)
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/api/me", me)
    r.add_get("/api/status", status)
    r.add_get("/guide-demo.html", guide_demo)
    return app


async def start_site(settings: SiteSettings | None = None, *, host: str = "127.0.0.1",
                     port: int = 0) -> web.AppRunner:
    """Start the site (port 0 picks a free one); the caller owns the runner."""
    runner = web.AppRunner(create_site_app(settings), handle_signals=False,
                           shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner

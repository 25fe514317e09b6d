"""The one-tag loader script and the small integration page.

Every value that reaches the browser is encoded for where it lands: JSON with ``<``, ``>``,
``&`` and the JavaScript line separators escaped inside the loader (so ``</script>`` or an
HTML comment opener in a display name stays text), and HTML-escaped in the page.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from string import Template

__all__ = [
    "SETTINGS_PLACEHOLDER",
    "loader_source",
    "render_loader",
    "render_page",
    "script_json",
]

SETTINGS_PLACEHOLDER = "/*@CEC_GATEWAY_SETTINGS@*/null"

# Labels for the page, in display order; other settings follow under their own names.
_PAGE_LABELS: tuple[tuple[str, str], ...] = (
    ("mode", "Authentication mode"),
    ("tenantSpaceId", "Tenant space"),
    ("configId", "Channel config"),
    ("locale", "Locale"),
    ("mapService", "Map service"),
    ("contextPath", "Context path"),
    ("cobrowse", "Co-browsing"),
    ("userId", "User id"),
    ("userName", "User name"),
)
_HIDDEN_ON_PAGE = frozenset({"token"})


@cache
def loader_source() -> str:
    """The loader's JavaScript template (``static/chat.js``)."""
    text = resources.files("gateway.chat").joinpath("static/chat.js").read_text("utf-8")
    if text.count(SETTINGS_PLACEHOLDER) != 1:
        raise RuntimeError("chat.js must contain the settings placeholder exactly once")
    return text


@cache
def _page_template() -> Template:
    text = resources.files("gateway.chat").joinpath("templates/page.html").read_text("utf-8")
    return Template(text)


def script_json(value: object) -> str:
    """JSON that is safe inside a ``<script>`` element and inside JavaScript source.

    ``ensure_ascii`` turns U+2028/U+2029 (line terminators in older JavaScript) and every
    other non-ASCII character into ``\\uXXXX``; ``<``, ``>`` and ``&`` are escaped as well so
    that neither ``</script>`` nor ``<!--`` can appear.
    """
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_loader(settings: Mapping[str, object]) -> bytes:
    """The loader script with ``settings`` embedded (UTF-8 bytes).

    Expected keys: contextPath, mode ("authorization" | "token"), configId, tenantSpaceId,
    locale, mapService, userId, userName, token (or None), cobrowse (bool).
    """
    return loader_source().replace(SETTINGS_PLACEHOLDER, script_json(dict(settings)), 1).encode(
        "utf-8"
    )


def _display(value: object) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def render_page(
    settings: Mapping[str, object],
    *,
    loader_path: str,
    title: str = "Customer service chat",
) -> bytes:
    """The integration page: the configured values (HTML-escaped) and the one loader tag."""
    labels = dict(_PAGE_LABELS)
    keys = [k for k, _ in _PAGE_LABELS if k in settings]
    keys += [k for k in settings if k not in labels and k not in _HIDDEN_ON_PAGE]
    rows = "\n".join(
        f"<tr><th>{html.escape(labels.get(k, k))}</th>"
        f"<td>{html.escape(_display(settings[k]))}</td></tr>"
        for k in keys
    )
    lang = "zh-CN" if settings.get("locale") == "zh" else "en"
    page = _page_template().substitute(
        lang=lang,
        title=html.escape(title),
        loader_path=html.escape(loader_path, quote=True),
        rows=rows,
    )
    return page.encode("utf-8")

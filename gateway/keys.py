"""Typed per-request state shared between the dispatcher and the endpoints it calls."""

from aiohttp import web

# The real client address, computed from the peer and trusted_proxies (never from headers
# an untrusted peer wrote).
CLIENT_IP = web.RequestKey("client_ip", str)
REQUEST_ID = web.RequestKey("request_id", str)

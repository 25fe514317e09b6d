"""The CEC chat gateway: one origin in front of an enterprise site and the CEC web chat.

How a request flows (one module per step):

1. ``server``   accepts the connection (aiohttp's C parser), enforces header size and the
                client-header timeout, and hands each parsed request to ``app.Gateway``.
2. ``app``      resolves the client address (``headers.real_client_ip``), answers CORS
                preflights (``cors``), dispatches the gateway's own endpoints (loader,
                signing, tokens, validation callback) and otherwise picks a route
                (``routing``: longest prefix wins, nginx ``proxy_pass`` path mapping).
3. ``proxy``    streams the request to the upstream over a pooled keep-alive connection
                (``upstream``: a lean asyncio protocol, not ``ClientSession``), rewriting
                headers on the way (``headers``: hop-by-hop, forwarded, Set-Cookie,
                Location), and streams the answer back. ``websocket`` splices upgraded
                connections byte for byte.
4. ``accesslog`` writes one line per request.

Credentials never leave the process: ``signing`` makes auth-v2 signatures, ``chat``
rewrites the widget's ``thirdUserData`` with the gateway-owned identity (``chat.inject``),
``tokens`` issues and validates logged-in tokens. ``sandbox`` is a stand-in for the CEC.
"""

__version__ = "0.1.0"

"""Guest and logged-in web chat: identity cookie, ``thirdUserData`` rewriting, loader, page.

``guest``     the signed guest-id cookie.
``inject``    the pure rewrite of the widget's ``thirdUserData`` (forced identity, signature).
``loader``    the one-tag loader script and the small integration page.
``endpoints`` the aiohttp handlers that tie them to the configuration.
"""

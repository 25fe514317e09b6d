"""``gateway demo``: the CEC sandbox, a sample enterprise site and the gateway in one process.

``site``  the sample enterprise site (pages with the one-tag loader, a fake login, ``/api/me``,
          and a page written the way the vendor's guide writes its integration page).
``run``   starts the three servers from one configuration and stops them on a signal.
``cli``   the ``gateway demo`` and ``gateway sandbox`` subcommands.
"""

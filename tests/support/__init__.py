"""Shared test helpers: one of each (ports, gateway processes, raw HTTP, upstreams, gateway).

Test modules import them as ``tests.support.<module>``.
"""

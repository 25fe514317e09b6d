"""A stand-in for the CEC's ``/service-cloud/``: auth checks, the chat widget, an agent console.

Public API:

- :class:`~gateway.sandbox.settings.SandboxSettings`, :func:`load_sandbox_settings`
- :func:`create_sandbox_app`, :func:`start_sandbox`, :func:`run_sandbox`, :func:`runner_url`
- :class:`~gateway.sandbox.authv2.AuthV2Verifier` (independent of ``gateway.signing``)
- :class:`~gateway.sandbox.chat.ChatHub` (queueing, robot, ratings; pure asyncio)
"""

from gateway.sandbox.settings import SandboxSettings, load_sandbox_settings

__all__ = ["SandboxSettings", "load_sandbox_settings"]

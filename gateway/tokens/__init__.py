"""Token mode: token storage, guessing/flood protection, and the CEC validation callback."""

from gateway.tokens.guard import Guard, guard_from_config, open_guard
from gateway.tokens.handlers import TokenEndpoints
from gateway.tokens.store import (
    IssuedToken,
    MemoryTokenStore,
    RedisTokenStore,
    TokenBackendUnavailable,
    TokenStore,
    TokenStoreFull,
    open_store,
)

__all__ = [
    "Guard",
    "IssuedToken",
    "MemoryTokenStore",
    "RedisTokenStore",
    "TokenBackendUnavailable",
    "TokenEndpoints",
    "TokenStore",
    "TokenStoreFull",
    "guard_from_config",
    "open_guard",
    "open_store",
]

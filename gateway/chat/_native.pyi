from collections.abc import Callable

class FlatRewriter:
    def __init__(
        self,
        tenant: str,
        channel: str,
        uri: str,
        name_limit: int,
        secret: bytes,
        prefix_head: str,
        prefix_tail: str,
        signed_line: str,
        has_length: bool,
        type_line: str | None,
        payload_fields: tuple[str, ...],
        timestamp_at: Callable[[int], str],
    ) -> None: ...
    def rewrite(
        self,
        body: bytes,
        user_id: str,
        now_ms: int,
        name: str | None = None,
        default_name: str | None = None,
        /,
    ) -> bytes | None: ...

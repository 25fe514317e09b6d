"""Mutation fuzzing of ``FlatRewriter.rewrite`` for a sanitizer build (see test_chat_native_asan).

    python native_fuzz.py PATH_TO_SO SECONDS

Loads the extension from PATH_TO_SO, feeds it mutated thirdUserData bodies (the page controls
every byte of them) for SECONDS, and prints one JSON line: runs, and how many were rewritten.
Memory errors are the sanitizer's to report; this script only drives the parser.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time

SEEDS = [
    b'{"thirdUserName":"Tom","thirdUserId":"x","tenantSpaceId":"1","channelConfigId":"2",'
    b'"locale":"zh","timestamp":"t","n":-12,"b":true,"z":null}',
    b"{}",
    b' { "a" : "\xe5\xbc\xa0" , "thirdPartAuthorization":1, "timestamp": 5 } ',
    b'{"' + b"k" * 3000 + b'":"' + b"v" * 5000 + b'"}',
    b"{" + b",".join(b'"k%d":%d' % (i, i) for i in range(70)) + b"}",
    b'{"thirdUserName":"' + b"N" * 4000 + b'"}',
    b'{"secretKey":"s","Third_User_Id":"x","a":123456789012345678}',
]
ALPHABET = b'{}[]":,-.eE0123456789truefalsn \t\r\n\\\x7f\xe5\xbc\xa0\xff\xc0\xed\xf0\x90\xf4'
USER_IDS = ["guest-0123456789abcdef0123", "u", "", "x" * 300, "guest-\u00e9", 'a"b']
NAMES = [None, "Alice", "", " ", "N" * 5000, "\u5f20", "\ud800", "a\\b"]


def main() -> int:
    path, seconds = sys.argv[1], float(sys.argv[2])
    spec = importlib.util.spec_from_file_location("gateway.chat._native", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rewriter = mod.FlatRewriter(
        "202007159031", "202011230001", "/service-cloud/x.js", 64, b"s" * 43, "auth-v2/ak/",
        "/content-length;content-type", "content-length;content-type", True,
        "content-type:application%2Fjson;charset%3DUTF-8",
        ("thirdUserName", "thirdUserId", "tenantSpaceId", "channelConfigId"),
        lambda ms: f"2026-01-01T00:00:00.{ms % 1000:03d}Z")
    rnd = random.Random(1)
    runs = rewritten = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = bytearray(rnd.choice(SEEDS))
        for _ in range(rnd.randint(0, 6)):
            op, i = rnd.random(), rnd.randrange(len(body) + 1)
            if op < 0.4 and body:
                del body[i % len(body)]
            elif op < 0.8:
                body[i:i] = bytes([rnd.choice(ALPHABET)])
            else:
                del body[i:]
        args: list[object] = [bytes(body), rnd.choice(USER_IDS), 1795853783991 + rnd.randrange(3)]
        if rnd.random() < 0.3:  # a logged-in user: the name chosen, the user id as default
            args += [rnd.choice(NAMES), rnd.choice(NAMES)]
        out = rewriter.rewrite(*args)
        runs += 1
        rewritten += out is not None
    sys.stdout.write(json.dumps({"runs": runs, "rewritten": rewritten}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one native part: the chat injection rewrite (gateway/chat/_native.c).

Optional: without a C compiler or OpenSSL's headers the build is skipped and the gateway
rewrites every body in Python (gateway/chat/inject.py, the reference), only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway.chat._native",
            ["gateway/chat/_native.c"],
            libraries=["crypto"],
            # SHA256_Init and friends: deprecated in OpenSSL 3 in favour of EVP, whose
            # per-call allocations are what this module exists to avoid.
            extra_compile_args=["-O2", "-Wall", "-Wno-deprecated-declarations"],
            optional=True,
        )
    ]
)

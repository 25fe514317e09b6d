"""Loading certificates and CA files: one loader for `check`, `run` and reload.

`gateway check` validates with the very functions `run` uses, so a pair that cannot be
loaded is refused by both, with the key path and a fix instead of an OpenSSL code. Private
keys are never read by anything else and never shown.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TLSFilesError(ValueError):
    """A certificate, key or CA file that OpenSSL refuses; the message says what to do."""


def _encrypted_key() -> bytes:
    # Without a password callback OpenSSL would prompt on the terminal and hang a service.
    raise TLSFilesError(
        "the key_file is encrypted (it asks for a pass phrase); fix: store it unencrypted "
        "with restricted permissions, e.g. `openssl pkey -in key.pem -out key.plain.pem`"
    )


def _explain(exc: ssl.SSLError, what: str) -> str:
    reason = (exc.reason or "").upper()
    if "KEY_VALUES_MISMATCH" in reason:
        return "the key_file does not belong to the cert_file; fix: use the key the " \
               "certificate was issued for"
    if "NO_CERTIFICATE" in reason:
        return f"the {what} holds no PEM certificate; fix: point it at the CA certificate " \
               "(-----BEGIN CERTIFICATE-----)"
    if "NO_START_LINE" in reason or "PEM" in reason or "ASN1" in reason or "DECODER" in reason:
        return f"the {what} is not PEM (-----BEGIN ...-----); fix: convert it, e.g. " \
               f"`openssl x509 -inform der -in file.der -out file.pem`"
    if "EE_KEY_TOO_SMALL" in reason or "CA_MD_TOO_WEAK" in reason:
        return f"the {what} is too weak for OpenSSL's security level ({exc.reason}); " \
               "fix: reissue it with a 2048-bit RSA or an EC key and SHA-256"
    return f"OpenSSL cannot load the {what} ({exc.reason or exc.strerror or 'not PEM'}); " \
           "fix: check that they are a PEM certificate chain and its PEM key, not truncated"


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS server context with this pair loaded; TLSFilesError names what is wrong."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    for name, path in (("cert_file", cert_file), ("key_file", key_file)):
        if not Path(path).is_file():
            raise TLSFilesError(f"{name} {str(path)!r} is not a readable file")
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file), password=_encrypted_key)
    except ssl.SSLError as exc:
        raise TLSFilesError(_explain(exc, "cert_file or key_file")) from None
    except OSError as exc:
        raise TLSFilesError(f"cannot read the certificate or key: {exc.strerror}") from None
    return ctx


def check_ca_file(ca_file: Path, *, into: ssl.SSLContext | None = None) -> None:
    """Load ``ca_file`` as OpenSSL will when connecting; TLSFilesError if it cannot."""
    ctx = into or ssl.create_default_context()
    if not Path(ca_file).is_file():
        raise TLSFilesError(f"ca_file {str(ca_file)!r} is not a readable file")
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except ssl.SSLError as exc:
        raise TLSFilesError(_explain(exc, "ca_file")) from None
    except OSError as exc:
        raise TLSFilesError(f"cannot read the ca_file: {exc.strerror}") from None

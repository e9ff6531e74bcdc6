"""TLS parameters of amqps:// URLs (zenflow._tls) and their checks in Settings."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from zenflow import _tls
from zenflow.config import Settings
from zenflow.errors import ConfigurationError, TransportError


def test_plain_url_unchanged() -> None:
    url = "amqp://guest:pw@127.0.0.1:5672/vhost?heartbeat=30"

    address = _tls.parse(url)

    assert address.url == url
    assert address.tls is None


def test_amqps_without_parameters_verifies() -> None:
    address = _tls.parse("amqps://guest:pw@rabbit.internal/")

    assert address.url == "amqps://guest:pw@rabbit.internal/"
    assert address.tls == _tls.TlsOptions()
    context = address.tls.context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls_parameters_removed_from_url() -> None:
    address = _tls.parse(
        "amqps://guest:p%40ss@127.0.0.1:5671/%2F?cafile=%2Fetc%2Fca.pem&heartbeat=30"
        "&certfile=c.pem&keyfile=k.pem&server_name=rabbit.internal&verify=true"
    )

    assert address.url == "amqps://guest:p%40ss@127.0.0.1:5671/%2F?heartbeat=30"
    assert address.tls == _tls.TlsOptions(
        cafile="/etc/ca.pem", certfile="c.pem", keyfile="k.pem", server_name="rabbit.internal"
    )


@pytest.mark.parametrize(("text", "expected"), [("false", False), ("0", False), ("TRUE", True)])
def test_verify_values(text: str, expected: bool) -> None:
    address = _tls.parse(f"amqps://127.0.0.1/?verify={text}")

    assert address.tls is not None
    assert address.tls.verify is expected


def test_verify_false_checks_nothing() -> None:
    context = _tls.TlsOptions(verify=False).context()

    assert context.verify_mode == ssl.CERT_NONE
    assert context.check_hostname is False


INVALID = {
    "tls on amqp": ("amqp://127.0.0.1/?cafile=ca.pem", "need an amqps:// URL"),
    "pika ssl_options": ("amqps://127.0.0.1/?ssl_options=%7B%7D", "'ssl_options' is not supported"),
    "aiormq no_verify_ssl": ("amqps://127.0.0.1/?no_verify_ssl=1", "use verify=false"),
    "capath": ("amqps://127.0.0.1/?capath=%2Fetc", "use cafile"),
    "verify": ("amqps://127.0.0.1/?verify=maybe", "invalid value 'maybe'"),
    "twice": ("amqps://127.0.0.1/?cafile=a&cafile=b", "'cafile' appears twice"),
    "empty": ("amqps://127.0.0.1/?cafile=", "'cafile' is empty"),
    "keyfile alone": ("amqps://127.0.0.1/?keyfile=k.pem", "needs 'certfile'"),
}


@pytest.mark.parametrize(("url", "fragment"), INVALID.values(), ids=INVALID.keys())
def test_invalid_parameters_rejected(url: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as failure:
        _tls.parse(url)

    assert fragment in str(failure.value)


def test_settings_reject_invalid_tls_without_password() -> None:
    with pytest.raises(ConfigurationError) as failure:
        Settings(amqp_url="amqp://guest:s3cret@127.0.0.1/?certfile=c.pem")

    message = str(failure.value)
    assert "invalid AMQP URL 'amqp://guest:***@127.0.0.1/?certfile=c.pem'" in message
    assert "need an amqps:// URL" in message
    assert "s3cret" not in message


def test_missing_cafile_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"

    with pytest.raises(ConfigurationError) as failure:
        _tls.TlsOptions(cafile=str(missing)).context()

    assert f"cannot load the TLS cafile {str(missing)!r}" in str(failure.value)


def test_invalid_certfile_named(tmp_path: Path) -> None:
    certfile = tmp_path / "client.pem"
    certfile.write_text("not a certificate")

    with pytest.raises(ConfigurationError) as failure:
        _tls.TlsOptions(certfile=str(certfile)).context()

    assert f"cannot load the TLS certfile or keyfile {str(certfile)!r}" in str(failure.value)


def test_hint_names_verification_failure() -> None:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "unable to get local issuer certificate"
    error = TransportError("wrapped")
    error.__cause__ = OSError(cause)

    hint = _tls.failure_hint(error, tls=True)

    assert "failed verification (unable to get local issuer certificate)" in hint
    assert "cafile" in hint
    assert _tls.failure_hint(error, tls=False) == ""


def test_hint_skips_refused_connections() -> None:
    error = OSError(ConnectionRefusedError(111, "Connection refused"))

    assert _tls.failure_hint(error, tls=True) == ""
    assert "certfile and keyfile" in _tls.failure_hint(OSError("lost"), tls=True)

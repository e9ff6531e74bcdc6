"""TLS for ``amqps://`` URLs, the same for pika (the blocking client) and aio-pika.

pika and aio-pika read different TLS options from a URL's query: pika 1.4 a Python dict
in ``ssl_options``, aio-pika 10 (through aiormq 7) ``cafile``, ``certfile``, ``keyfile``
and ``no_verify_ssl``. So zenflow reads parameters of its own and removes them from the
URL. Then it builds one :class:`ssl.SSLContext` and hands it to the library.
docs/configuration.md documents these parameters:

``cafile``
    PEM file of the certificate authorities that the broker's certificate must chain to.
    Default: the system's trusted authorities.
``certfile``, ``keyfile``
    PEM files of the client certificate (with its chain) and its private key, for brokers
    that require client certificates. ``keyfile`` may be left out when ``certfile`` contains
    the key too.
``server_name``
    The host name that the broker's certificate must name, also sent as SNI. Default: the
    URL's host.
``verify``
    ``true`` (default) or ``false``. ``false`` accepts any certificate under any name,
    which protects against nothing but passive eavesdropping.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from zenflow.errors import ConfigurationError

TLS_PARAMETERS = ("cafile", "certfile", "keyfile", "server_name", "verify")

# TLS parameters that only one of the two libraries reads, with zenflow's replacement.
_LIBRARY_PARAMETERS = {
    "ssl_options": "cafile, certfile, keyfile, server_name and verify",
    "no_verify_ssl": "verify=false",
    "capath": "cafile",
    "cadata": "cafile",
}
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclasses.dataclass(frozen=True)
class TlsOptions:
    """The TLS parameters of an ``amqps://`` URL."""

    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    server_name: str | None = None
    verify: bool = True

    def context(self) -> ssl.SSLContext:
        """Build the client context: TLS 1.2 or newer, certificates checked unless ``verify``
        is false.

        Raises:
            ConfigurationError: a file cannot be read or is not a valid PEM file.
        """
        context = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
        context.server_name = self.server_name
        try:
            if self.cafile is None:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            else:
                context.load_verify_locations(cafile=self.cafile)
        except (OSError, ssl.SSLError) as error:
            raise _file_error("cafile", self.cafile, error) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certfile is not None:
            try:
                context.load_cert_chain(self.certfile, self.keyfile)
            except (OSError, ssl.SSLError) as error:
                raise _file_error("certfile or keyfile", self.certfile, error) from None
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class _NamedContext(ssl.SSLContext):
    """A client context that checks, and sends as SNI, ``server_name`` in place of the host.

    aio-pika offers no way to pass ``server_hostname`` down to asyncio, which uses the host
    of the URL, so the context overrides the name where it wraps the connection.
    """

    server_name: str | None = None

    def wrap_socket(  # type: ignore[override]
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.server_name or server_hostname,
            session=session,
        )

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=self.server_name or server_hostname,
            session=session,
        )


@dataclasses.dataclass(frozen=True)
class BrokerAddress:
    """An AMQP URL split into the URL that the library reads and zenflow's TLS options."""

    url: str  # the URL without zenflow's TLS parameters
    tls: TlsOptions | None  # None for amqp://


def parse(url: str) -> BrokerAddress:
    """Split an AMQP URL into the library's URL and zenflow's TLS options.

    Raises:
        ConfigurationError: a TLS parameter is invalid, appears on an ``amqp://`` URL, or is
            one that only pika or only aio-pika reads. The message has no password.
    """
    parts = urlsplit(url)
    library_parameters: list[tuple[str, str]] = []
    found: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _LIBRARY_PARAMETERS:
            raise ConfigurationError(
                f"the AMQP URL parameter {name!r} is not supported, because only one of the "
                f"AMQP libraries reads it: use {_LIBRARY_PARAMETERS[name]}"
            )
        if name in TLS_PARAMETERS:
            if name in found:
                raise ConfigurationError(
                    f"the AMQP URL parameter {name!r} appears twice: give it once"
                )
            found[name] = value
        else:
            library_parameters.append((name, value))
    library_url = url
    if found:
        library_url = urlunsplit(parts._replace(query=urlencode(library_parameters)))
    if parts.scheme != "amqps":
        if found:
            raise ConfigurationError(
                f"the TLS parameters {', '.join(sorted(found))} of the AMQP URL need an "
                "amqps:// URL (RabbitMQ's TLS port is 5671 by default)"
            )
        return BrokerAddress(library_url, None)
    return BrokerAddress(library_url, _tls_options(found))


def _tls_options(found: dict[str, str]) -> TlsOptions:
    for name in ("cafile", "certfile", "keyfile", "server_name"):
        if name in found and not found[name]:
            raise ConfigurationError(
                f"the AMQP URL parameter {name!r} is empty: give a value or remove it"
            )
    if "keyfile" in found and "certfile" not in found:
        raise ConfigurationError(
            "the AMQP URL parameter 'keyfile' needs 'certfile', the client certificate"
        )
    verify = _BOOLEANS.get(found.get("verify", "true").lower())
    if verify is None:
        raise ConfigurationError(
            f"invalid value {found['verify']!r} of the AMQP URL parameter 'verify': use true "
            "or false"
        )
    return TlsOptions(
        cafile=found.get("cafile"),
        certfile=found.get("certfile"),
        keyfile=found.get("keyfile"),
        server_name=found.get("server_name"),
        verify=verify,
    )


def _file_error(parameter: str, path: str | None, error: BaseException) -> ConfigurationError:
    return ConfigurationError(
        f"cannot load the TLS {parameter} {path!r} of the AMQP URL: "
        f"{type(error).__name__}: {error}. Give PEM files that this process can read"
    )


def failure_hint(error: BaseException, tls: bool) -> str:
    """Return advice for a failed connection over TLS (``tls``), else ''.

    pika and aio-pika wrap the ssl module's errors in their own, in ``args``, ``__cause__``
    or a list of attempts, so the search walks all of them. A broker that requires a client
    certificate and gets none closes the connection after a TLS 1.3 handshake, which the
    client sees as a lost connection, not as a TLS error.
    """
    if not tls:
        return ""
    causes = list(_causes(error, set()))
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f". The broker's TLS certificate failed verification ({cause.verify_message}):"
                " check that the URL's cafile parameter names the authority that signed it, "
                "and that its server_name (default: the URL's host) is a name in it"
            )
    for cause in causes:
        if isinstance(cause, ConnectionRefusedError) or "Authentication" in type(cause).__name__:
            return ""
    return (
        ". The connection used TLS: check that the port is the broker's TLS port, and give "
        "the certfile and keyfile parameters if the broker requires a client certificate"
    )


def _causes(error: object, seen: set[int]) -> Iterator[BaseException]:
    if isinstance(error, list | tuple):
        for item in error:
            yield from _causes(item, seen)
        return
    if not isinstance(error, BaseException) or id(error) in seen:
        return
    seen.add(id(error))
    yield error
    nested = (error.__cause__, error.__context__, error.args, getattr(error, "exceptions", None))
    for item in nested:
        yield from _causes(item, seen)

"""The web face's TLS: the node's certificate and policy from :mod:`pacs_node.tls`, renewed
without a restart.

uvicorn hands one ``ssl.SSLContext`` to asyncio, which calls its ``wrap_bio`` once per
connection. :class:`LiveServerContext` is that context: each call takes the context of a
:class:`~pacs_node.tls.ReloadingContext`, so a certificate replaced on disk serves the next
connection, as on the DICOM TLS port. Client certificates are the web face's own choice
(``web_tls_client_cert``): browsers rarely carry one, so DICOM's mutual authentication does not
force it on them.
"""

from __future__ import annotations

import ssl
from typing import Any

from pacs_node.config import NodeOptions
from pacs_node.errors import ConfigError
from pacs_node.tls import ReloadingContext, TLSFileError, TLSFiles, server_context


class LiveServerContext(ssl.SSLContext):
    """A server context whose connections take the latest context of ``source``."""

    source: ReloadingContext

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        return self.source.context().wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        return self.source.context().wrap_socket(*args, **kwargs)


def web_server_context(options: NodeOptions, source: str = "node.yaml") -> LiveServerContext:
    """The context uvicorn serves HTTPS with; a file that does not load, or a client
    certificate asked for without ``tls_ca_file``, is a :class:`ConfigError` from ``source``."""
    mode = options.web_tls_client_cert
    files = TLSFiles(
        options.tls_cert_file, options.tls_key_file, options.tls_ca_file if mode != "none" else None
    )
    if mode != "none" and files.ca_file is None:
        raise ConfigError(source, "web_tls_client_cert", f"{mode!r} needs tls_ca_file")

    def build() -> ssl.SSLContext:
        return server_context(files, require_client_cert=mode == "required")

    try:
        reloading = ReloadingContext(build, files.paths())
    except TLSFileError as exc:
        raise ConfigError(source, exc.key, exc.reason) from exc
    live = LiveServerContext(ssl.PROTOCOL_TLS_SERVER)
    live.source = reloading
    return live

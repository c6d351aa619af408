"""Small stream adapters that know nothing of DICOM or TLS."""

from __future__ import annotations

import trio


class PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read from ``inner`` (after sniffing).

    ``tls = "auto"`` listeners and the PROXY protocol read a few bytes to decide
    what comes next; those bytes must still reach whoever reads the stream next.
    """

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return the prefix first (up to ``max_bytes``), then read from ``inner``."""
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send through ``inner``."""
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Delegate to ``inner``."""
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close ``inner``."""
        await self.inner.aclose()


"""TLS for the gateway: pyOpenSSL on memory BIOs as a trio stream.

* :mod:`gateway.tls.stream` — :class:`~gateway.tls.stream.TLSStream`
* :mod:`gateway.tls.context` — listener/backend contexts, SNI, evidence
* :mod:`gateway.tls.profiles` — DICOM PS3.15 Annex B profiles
* :mod:`gateway.tls.certs` — loading, thumbprints, identity checks
"""

"""dicom-tls-gateway: a DICOM-aware TLS gateway for devices that cannot speak TLS."""

__version__ = "0.1.0"

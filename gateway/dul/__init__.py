"""Sans-IO DICOM upper layer (PS3.8 §9): PDU codec, framer and relay tracker.

Nothing in this package performs I/O or imports trio or OpenSSL:

* ``ae``       -- AE title decoding, encoding and validation;
* ``pdus``     -- frozen dataclasses for the seven PDUs and their items;
* ``codec``    -- ``decode_pdu`` / ``encode_pdu`` and the hot-path
                  ``encode_reject`` / ``encode_abort``;
* ``framer``   -- ``PDUFramer``: chunks in, whole PDUs out, with a length cap;
* ``tracker``  -- ``PDUTracker``: PDU boundaries for the relay, no copies;
* ``constants``-- the PS3.8 numbers as enums (also re-exported by ``codec``).
"""

"""The certificate builders of ``certs-example/make-certs.py``, importable by the tests.

The demo PKI script is the one place that knows how to build a CA and a leaf;
the test PKIs (``tests/tls_helpers.py``, ``tests/interop/helpers.py``) use the
same code with their own names and validity.  The script's file name has a
hyphen (it is run, not imported), hence the loader.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "certs-example" / "make-certs.py"
_spec = importlib.util.spec_from_file_location("gateway_make_certs", _PATH)
if _spec is None or _spec.loader is None:
    raise ImportError(f"cannot load {_PATH}")
make_certs = importlib.util.module_from_spec(_spec)
# Registered before running: dataclasses and pickling look modules up by name.
sys.modules[_spec.name] = make_certs
_spec.loader.exec_module(make_certs)

__all__ = ["make_certs"]

"""``python -m gateway`` is the same as the ``dicom-gateway`` command."""

import sys

from .cli import main

sys.exit(main())

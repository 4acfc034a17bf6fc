"""The server side of the engine stays free of the training stack (DESIGN.md, layers)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow  # imports the server side in a fresh process
def test_server_side_modules_never_import_torch_transformers_or_peft():
    probe = (
        "import sys\n"
        "import pollinate_runtime.wire, pollinate_runtime.aggregation\n"
        "import pollinate_runtime.privacy, pollinate_runtime.store\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft', 'bitsandbytes'))\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stdout.strip() == ""

"""The workflow module must stay free of torch: the sandbox re-imports workflow modules."""

from __future__ import annotations

import subprocess
import sys


def test_workflow_module_imports_no_torch_or_numpy() -> None:
    code = "import sys, workflows.experiment; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""The proto is the contract: the checked-in stubs must be what it generates, and it must lint."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_match_the_proto():
    proc = subprocess.run(["bash", "scripts/gen_protos.sh", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_buf_lint_passes():
    assert shutil.which("buf"), "buf is not installed (pip install buf-bin)"
    proc = subprocess.run(["buf", "lint"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_client_package_does_not_need_torch():
    code = "import sys, rstitch, rstitch.cli, rstitch.local; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run(["python", "-c", code], cwd=ROOT / "client", check=True)

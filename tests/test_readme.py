"""The README's quick path, run as written: its marked shell block, in a fresh folder that holds the
scripts, on synthetic data. If the README's commands change, this runs the new ones."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

MARK = "<!-- quick-path: tests/test_readme.py runs this block as written -->"


def quick_path_block():
    text = open(os.path.join(ROOT, "README.md")).read()
    found = re.search(re.escape(MARK) + r"\s*```bash\n(.*?)```", text, re.S)
    assert found, "README.md lost its quick-path block"
    return found.group(1)


def test_readme_quick_path_runs_as_written(tmp_path, synthetic_dir):
    block = quick_path_block()
    # A fresh folder with the scripts, as in a clone (the packages come from the installation).
    for name in ("train.py", "test.py", "chain.py", "torchscope"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    # `python` is this interpreter, as in the README's activated virtual environment.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, D=synthetic_dir, OMP_NUM_THREADS="1", PATH=path)
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    # test.py and count.py found the narrow model in its checkpoint, with no flag repeated.
    assert out.count("efficientnet_ex (width 0.25, depth 0.34, cosine head)") >= 2, out
    assert "compressed: W8/A8" in out and "MicroNet score:" in out
    assert "no 16-bit freebie" in out and "[chain] done" in out
    assert os.path.isfile(tmp_path / "runs" / "tiny-chain" / "chain_report.md")

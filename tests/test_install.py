"""Install hygiene: an installed (non-editable) minipara keeps model files in the per-user cache,
a source checkout in weights/, and MINIPARA_WEIGHTS_DIR overrides both."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def weights_dir(pythonpath: Path, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("MINIPARA_WEIGHTS_DIR", "XDG_CACHE_HOME")}
    run = subprocess.run(
        [sys.executable, "-c", "import minipara.io.weights as w; print(w.WEIGHTS_DIR)"],
        cwd=pythonpath,
        env={**clean, "PYTHONPATH": str(pythonpath), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_weights_go_to_the_user_cache_when_installed(tmp_path):
    site = tmp_path / "site-packages"  # the package alone, as pip installs it
    shutil.copytree(ROOT / "minipara", site / "minipara", ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    assert weights_dir(site, HOME=str(home)) == str(home / ".cache" / "minipara")
    assert weights_dir(site, HOME=str(home), XDG_CACHE_HOME=str(tmp_path / "xdg")) == str(tmp_path / "xdg" / "minipara")
    assert weights_dir(site, MINIPARA_WEIGHTS_DIR=str(tmp_path / "w")) == str(tmp_path / "w")
    assert weights_dir(ROOT, HOME=str(home)) == str(ROOT / "weights")  # a source checkout

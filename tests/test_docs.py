"""The documentation site builds with every warning treated as an error (as `make docs` and CI build it)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    for module in ("sphinx", "myst_parser", "furo"):
        pytest.importorskip(module)  # installed by the `dev` and `docs` extras
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    api = (tmp_path / "api.html").read_text()
    for name in ("GFMCallback", "ForecastRelativeError", "GFMLightningCLI", "JumpRecord"):
        assert name in api
    for page in ("guide", "integrations", "benchmark"):
        assert (tmp_path / f"{page}.html").exists()

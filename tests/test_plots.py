"""``dvc plots show`` offline: the page template in configs/plots/offline.html inlines vega,
vega-lite and vega-embed (scripts/make_plots_template.py, from the npm registry), and
``.dvc/config`` names it. Headless Chromium with every request to the network refused draws
the curves with it and nothing with DVC's default (CDN) page."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_report import _browser, _chromium

DVC = str(Path(sys.executable).parent / "dvc")
TEMPLATE = ROOT / "configs" / "plots" / "offline.html"
NO_NETWORK = "--proxy-server=http://127.0.0.1:9"  # a closed port: every fetch fails at once


def test_the_repository_uses_the_offline_template():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert (ROOT / ".dvc" / config["plots"]["html_template"]).resolve() == TEMPLATE
    text = TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in text and "cdn." not in text and "https://" not in text.split("<script>")[0]
    for name in ("vega 5.20.2", "vega-lite 5.2.0", "vega-embed 6.18.2"):
        assert f"/* {name} */" in text


def loss_project(tmp_path: Path) -> Path:
    project = tmp_path / "p"
    (project / "curves").mkdir(parents=True)
    for version, slope in (("v1", 0.30), ("v2", 0.15)):
        rows = "\n".join(f"{step}\t{7.6 - slope * step:.3f}" for step in range(1, 11))
        (project / "curves" / f"{version}.tsv").write_text(f"step\tloss\n{rows}\n", encoding="utf-8")
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=project, check=True)
    return project


def canvases(html: Path, profile: Path) -> int:
    chromium = _chromium()
    dom = _browser(chromium, profile, NO_NETWORK, "--virtual-time-budget=10000", "--dump-dom",
                   html.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout.count("<canvas")


def test_plots_render_offline_with_the_template_and_not_without(tmp_path):
    from PIL import Image

    project = loss_project(tmp_path)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    pages = {}
    for name, extra in (("offline", ["--html-template", str(TEMPLATE)]), ("default", [])):
        out = tmp_path / name
        proc = subprocess.run([DVC, "plots", "show", "curves/v1.tsv", "curves/v2.tsv", "-x", "step",
                               "-y", "loss", "-o", str(out), *extra], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        pages[name] = out / "index.html"
    assert canvases(pages["offline"], tmp_path / "profile") == 2   # one chart per curve file
    assert canvases(pages["default"], tmp_path / "profile") == 0   # the CDN page stays blank
    shot = tmp_path / "plots.png"
    result = _browser(_chromium(), tmp_path / "profile", NO_NETWORK, "--virtual-time-budget=10000",
                      f"--screenshot={shot}", "--window-size=1000,900", pages["offline"].as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    # DVC's plot template draws the first curve in #945dd6: nothing else on the page has it
    line = sum(n for n, c in colors if abs(c[0] - 148) < 12 and abs(c[1] - 93) < 12 and abs(c[2] - 214) < 12)
    assert line > 200, f"no curve on the screenshot ({line} px of the line colour)"

"""The HTML report: self-contained content, and (with Chromium) every figure and table really visible."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from test_results import STUDY_A_TABLES, build_study, standard_runs

from prunelab.experiments.store import Store

FIGURES = [
    {"kind": "accuracy_vs_params"},
    {"kind": "accuracy_vs_sparsity", "split_by": ["method"]},
    {"kind": "weight_histogram", "dataset": "mnist"},
    {"kind": "curves", "sparsity": 0.5},
]
SPEC = {
    "name": "Report <study>",
    "description": "First paragraph.\n\nSecond & last.",
    "outputs": {**STUDY_A_TABLES, "figures": FIGURES},
}
N_RESULT_TABLES = 2  # one per method (magl1, magl2)
N_OTHER_TABLES = 3  # study facts, runs by status, software versions


@pytest.fixture
def study(tmp_path):
    runs = standard_runs() + [
        {
            "dataset": "mnist",
            "method": "obd",
            "sparsity": 0.9,
            "seed": 0,
            "status": "failed",
            "error": "Traceback (most recent call last):\n  RuntimeError: Hessian <not> positive & definite",
        },
        {"dataset": "mnist", "method": "obd", "sparsity": 0.9, "seed": 1, "status": "pending"},
    ]
    return build_study(tmp_path / "study.db", runs, spec=SPEC)


def test_report_is_self_contained_and_has_every_section(study):
    from prunelab.experiments.report import write_report

    path = write_report(study)
    assert path == study.with_name("study_report.html")
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "<title>Report &lt;study&gt; — prunelab report</title>" in text
    assert '<p class="description">First paragraph.</p>' in text and "Second &amp; last." in text
    for section in ("Runs", "Tables", "Figures", "Failed runs", "Spec"):
        assert f"<h2>{section}</h2>" in text
    # Nothing outside the file: no links, scripts or remote URLs; images are data URIs.
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?data:)""", text)
    assert "<link" not in text and "<script" not in text and "http://" not in text and "https://" not in text
    assert text.count('src="data:image/png;base64,') == len(FIGURES)
    assert text.count('<table class="results">') == N_RESULT_TABLES
    # Counts by status, compute time, versions.
    assert "<tr><th>done</th><td>21</td></tr>" in text and "<tr><th>failed</th><td>1</td></tr>" in text
    assert "<tr><th>pending</th><td>1</td></tr>" in text
    assert "5.5 s" in text  # 22 finished runs × 0.25 s
    assert "2.13.0 (22 runs)" in text
    # Failed runs, collapsed, with their (escaped) error text.
    details = text[text.index("<details>") : text.index("</details>")]
    assert "<summary>1 failed run</summary>" in details
    assert "Hessian &lt;not&gt; positive &amp; definite" in details and "seed 0" in details
    # The spec as YAML.
    assert "name: Report &lt;study&gt;" in text and "kind: weight_histogram" in text


def test_report_tables_match_the_markdown_tables(study):
    from prunelab.experiments.report import write_report
    from prunelab.experiments.tables import build_tables

    text = write_report(study, study.parent / "out" / "r.html").read_text()
    with Store(study) as store:
        tables = build_tables(store.records(status="done"), SPEC["outputs"])
    for table in tables:
        assert table.to_html() in text
        for _, cells in table.rows:
            for cell in cells:
                assert cell is None or f"<td>{cell.text}</td>" in text


def test_report_of_a_study_without_finished_runs_or_figure_data(tmp_path):
    from prunelab.experiments.report import write_report

    runs = [
        {"dataset": "mnist", "method": "m", "sparsity": 0.5, "seed": s, "status": st, "error": "boom"}
        for s, st in enumerate(["pending", "failed"])
    ]
    text = write_report(build_study(tmp_path / "a.db", runs)).read_text()
    assert text.count("No finished runs yet (1 pending, 0 running, 1 failed).") == 2
    runs = [{"dataset": "mnist", "method": "m", "sparsity": 0.5, "seed": 0, "metrics": {"accuracy": 0.9}}]
    text = write_report(build_study(tmp_path / "b.db", runs)).read_text()
    assert "needs the metric &#x27;nonzero_params&#x27;" in text  # the default figure's data is missing
    assert '<table class="results">' in text


def test_report_and_plot_with_nothing_declared(tmp_path):
    from prunelab.experiments.figures import write_figures
    from prunelab.experiments.report import write_report

    path = build_study(tmp_path / "s.db", standard_runs(), spec={"outputs": {"tables": [], "figures": []}})
    assert write_figures(path, tmp_path / "figs") == []
    text = write_report(path).read_text()
    assert "The spec declares no tables." in text and "The spec declares no figures." in text
    assert "<h1>s</h1>" in text  # no name in the spec: the database's stem


# ----------------------------------------------------------------------------------- Chromium
CHECK_SCRIPT = """
<script>
window.addEventListener("load", function () {
  function boxed(el) { var r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; }
  function displayed(el) { var s = getComputedStyle(el); return s.display !== "none" && s.visibility !== "hidden"; }
  var out = {images: [], svgs: [], tables: []};
  document.querySelectorAll("img").forEach(function (img) {
    out.images.push({alt: img.alt, width: img.naturalWidth,
                     visible: img.complete && img.naturalWidth > 0 && boxed(img) && displayed(img)});
  });
  document.querySelectorAll("svg").forEach(function (svg) {
    if (!svg.parentElement.closest("svg")) out.svgs.push({visible: boxed(svg) && displayed(svg)});
  });
  document.querySelectorAll("table").forEach(function (table) {
    out.tables.push({cls: table.className, rows: table.rows.length, visible: boxed(table) && displayed(table)});
  });
  var pre = document.createElement("pre");
  pre.id = "visibility-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium or chromium-browser binary on PATH (CI installs Debian's chromium)")
    return binary


def _run_chromium(binary, tmp_path, *args):
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def test_every_figure_and_table_is_visible_in_chromium(study, tmp_path):
    from prunelab.experiments.report import write_report

    binary = _chromium()
    report = write_report(study)
    checked = tmp_path / "checked.html"
    checked.write_text(report.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = _run_chromium(binary, tmp_path, "--virtual-time-budget=5000", "--dump-dom", checked.as_uri()).stdout
    found = re.search(r'<pre id="visibility-check">(.*?)</pre>', dom, re.S)
    assert found, f"the check script did not run; DOM starts with {dom[:300]!r}"
    summary = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(summary["images"]) == len(FIGURES)
    assert [img["alt"] for img in summary["images"]] == [d["kind"] for d in FIGURES]
    assert all(img["visible"] and img["width"] > 100 for img in summary["images"]), summary["images"]
    assert summary["svgs"] == []  # figures are embedded as PNG
    tables = summary["tables"]
    assert len([t for t in tables if t["cls"] == "results"]) == N_RESULT_TABLES
    assert len(tables) == N_RESULT_TABLES + N_OTHER_TABLES
    assert all(t["visible"] and t["rows"] >= 2 for t in tables), tables


def test_report_screenshot_is_not_blank(study, tmp_path):
    from PIL import Image

    from prunelab.experiments.report import write_report

    binary = _chromium()
    report = write_report(study, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    _run_chromium(binary, tmp_path, "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri())
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        low, high = image.convert("L").getextrema()
        assert high - low > 100, "the screenshot is a single colour"
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or range(1 << 20)) > 50

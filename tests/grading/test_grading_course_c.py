"""The example C course, graded as the README says, and its reports: Gradescope JSON with
the documented fields, the CSV gradebook, and the HTML report rendered by Chromium."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from png import pixels

from sandboxd import cli

ROOT = Path(__file__).resolve().parents[2]
COURSE = ROOT / "examples" / "course-c"
#: Gradescope's documented fields for results.json and for each test.
TOP_FIELDS = {"score", "execution_time", "output", "visibility", "stdout_visibility", "tests"}
TEST_FIELDS = {"name", "score", "max_score", "status", "output", "visibility"}
#: The report's cell colours for passed and failed.
GREEN, RED = (0x2E, 0x7D, 0x32), (0xC6, 0x28, 0x28)


def _check_gradescope(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    assert set(data) <= TOP_FIELDS | {"extra_data", "leaderboard"}, data
    assert isinstance(data["score"], float)
    assert data["visibility"] in ("visible", "hidden", "after_due_date", "after_published")
    for test in data["tests"]:
        assert set(test) == TEST_FIELDS, test
        assert isinstance(test["name"], str) and test["name"]
        assert 0 <= test["score"] <= test["max_score"]
        assert test["status"] in ("passed", "failed")
        assert test["visibility"] in ("visible", "hidden", "after_due_date", "after_published")
    return data  # type: ignore[no-any-return]


def _screenshot(html: Path, png: Path) -> bytes:
    browser = shutil.which("chromium")
    assert browser, "chromium is missing: scripts/host-setup.sh installs it"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
         f"--screenshot={png}", html.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    return png.read_bytes()


@pytest.mark.docker
@pytest.mark.slow
def test_the_c_course_grades_and_reports(tmp_path: Path, address: str) -> None:
    out = tmp_path / "grades"
    code = cli.main([
        "grade", "--tests", str(COURSE / "tests"), "--submissions", str(COURSE / "submissions"),
        "--out", str(out / "results.json"), "--reports", str(out), "--address", address,
    ])  # fmt: skip
    assert code == 0
    document = json.loads((out / "results.json").read_text())
    subs = {s["name"]: s for s in document["submissions"]}
    assert {n: (s["verdict"], s["points"], s["max_points"]) for n, s in subs.items()} == {
        "broken": ("build_failed", 0.0, 0.0),
        "correct": ("passed", 5.0, 5.0),
        "loops": ("failed", 2.0, 5.0),
        "wrong": ("failed", 4.0, 5.0),
    }
    assert "expected ';'" in subs["broken"]["message"].replace("\u2018", "'").replace(
        "\u2019", "'"
    ), subs["broken"]["message"]
    loops = {r["test_id"]: r for r in subs["loops"]["results"]}
    assert loops["fib::fib_large"]["message"] == "timed out after 2.0s"
    assert {r["test_id"]: r["hidden"] for r in subs["wrong"]["results"]}["fib::fib_negative"]

    for name in subs:
        data = _check_gradescope(out / "gradescope" / name / "results.json")
        assert data["score"] == subs[name]["points"]
    hidden = json.loads((out / "gradescope" / "wrong" / "results.json").read_text())["tests"]
    assert [t["output"] for t in hidden if t["visibility"] == "hidden"] == [""]

    with (out / "gradebook.csv").open() as f:
        rows = {r["submission"]: r for r in csv.DictReader(f)}
    assert rows["wrong"]["score"] == "4.0" and rows["wrong"]["max_score"] == "5.0"
    assert rows["broken"]["verdict"] == "build_failed"
    assert float(rows["correct"]["cpu_seconds"]) > 0
    assert int(rows["correct"]["peak_memory_bytes"]) > 0

    # The report renders in a real browser: the matrix's green and red cells are there.
    report = out / "report.html"
    width, height, colours = pixels(_screenshot(report, tmp_path / "report.png"))
    assert (width, height) == (1200, 900)
    assert colours[GREEN] > 1000 and colours[RED] > 100, colours.most_common(5)

"""Reports: Gradescope's fields, a CSV no spreadsheet runs, HTML that escapes submissions."""

from __future__ import annotations

import csv
import io
from typing import Any

from sandboxd.grade_reports import gradebook_csv, gradescope, html_report, per_test_csv


def _result(test_id: str, outcome: str, message: str = "", hidden: bool = False) -> dict[str, Any]:
    worth = 2.0
    return {
        "test_id": test_id,
        "outcome": outcome,
        "message": message,
        "output": "details " + message if message else "",
        "score": worth if outcome == "passed" else 0.0,
        "max_score": worth,
        "hidden": hidden,
        "cpu_seconds": 0.25,
        "peak_memory_bytes": 3 << 20,
    }


def _sub(name: str, results: list[dict[str, Any]], verdict: str = "failed") -> dict[str, Any]:
    points = sum(r["score"] for r in results)
    return {
        "name": name,
        "verdict": verdict,
        "message": "1 of 3 tests failed",
        "points": points,
        "max_points": sum(r["max_score"] for r in results),
        "passed": sum(r["outcome"] == "passed" for r in results),
        "total": len(results),
        "cpu_seconds": 1.5,
        "peak_memory_bytes": 1 << 20,
        "wall_seconds": 3.2,
        "results": results,
    }


EVIL = "<script>alert(1)</script>"
DOCUMENT = {
    "image": {"digest": "sha256:abc"},
    "submissions": [
        _sub(
            f"=cmd|{EVIL}",
            [
                _result("m::a", "passed"),
                _result("m::b", "failed", f"assert {EVIL}"),
                _result("m::c", "failed", "secret expected value", hidden=True),
            ],
        ),
        _sub("ok", [_result("m::a", "passed")], "passed"),
    ],
}


def test_gradescope_hides_hidden_tests_output() -> None:
    data = gradescope(DOCUMENT["submissions"][0])
    assert data["score"] == 2.0
    tests = {t["name"]: t for t in data["tests"]}
    assert tests["m::b"] == {
        "name": "m::b",
        "score": 0.0,
        "max_score": 2.0,
        "status": "failed",
        "output": f"assert {EVIL}\ndetails assert {EVIL}",
        "visibility": "visible",
    }
    assert tests["m::c"]["visibility"] == "hidden" and tests["m::c"]["output"] == ""


def test_gradescope_without_tests_says_why() -> None:
    data = gradescope(_sub("x", [], "build_failed"))
    assert data["tests"][0]["output"].startswith("build_failed:")


def test_the_csv_does_not_start_a_cell_with_a_formula() -> None:
    rows = list(csv.DictReader(io.StringIO(gradebook_csv(DOCUMENT))))
    assert rows[0]["submission"].startswith("'=")
    assert (rows[0]["score"], rows[0]["max_score"], rows[0]["percent"]) == ("2.0", "6.0", "33.3")
    assert rows[1]["verdict"] == "passed"


def test_the_tests_csv_has_a_row_per_test_with_its_cost() -> None:
    rows = list(csv.DictReader(io.StringIO(per_test_csv(DOCUMENT))))
    assert [(r["test"], r["outcome"]) for r in rows] == [
        ("m::a", "passed"), ("m::b", "failed"), ("m::c", "failed"), ("m::a", "passed"),
    ]  # fmt: skip
    assert rows[0]["submission"].startswith("'=") and rows[3]["submission"] == "ok"
    assert (rows[1]["cpu_seconds"], rows[1]["peak_memory_bytes"]) == ("0.25", str(3 << 20))


def test_the_html_escapes_everything_and_loads_nothing() -> None:
    page = html_report(DOCUMENT)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for external in ("http://", "https://", "<link", "src="):
        assert external not in page
    assert "default-src 'none'" in page
    # Pass rates per test: m::a passed in both submissions, m::b in neither.
    assert "<td class='num'>2 / 2</td><td><span class='bar' style='width:100px'>" in page
    assert "<td class='num'>0 / 2</td>" in page
    assert "secret expected value" in page  # staff see hidden tests' failures
    assert "(CPU 0.25 s, peak 3 MiB)" in page

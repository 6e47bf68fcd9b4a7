"""Reports from a grading results document, in the formats course staff already use.

- `gradescope/NAME/results.json`: Gradescope's autograder results format (per-test
  name, score, max_score, status, output, visibility). Hidden tests get visibility
  "hidden" and no output, so not even a mistaken release shows their text.
- `junit/NAME.xml`: JUnit XML per submission, for CI tools.
- `gradebook.csv`: one row per submission for a spreadsheet; `tests.csv`: one row per
  test of each submission, with what the test cost (CPU seconds, peak memory).
- `report.html`: one self-contained page (no scripts, no external resources) with a
  submissions x tests matrix coloured by outcome, per-test pass rates and every failure's
  message. Everything that came from a submission is escaped.
"""

from __future__ import annotations

import csv
import html
import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sandboxd.gradebook import TestResult

CSV_FIELDS = (
    "submission",
    "score",
    "max_score",
    "percent",
    "verdict",
    "passed",
    "total",
    "cpu_seconds",
    "peak_memory_bytes",
    "wall_seconds",
    "message",
)
TEST_CSV_FIELDS = (
    "submission",
    "test",
    "outcome",
    "score",
    "max_score",
    "hidden",
    "cpu_seconds",
    "peak_memory_bytes",
    "message",
)
#: Outcome -> (cell colour, symbol); a symbol too, so the matrix reads without colour.
CELLS = {
    "passed": ("#2e7d32", "✓"),
    "failed": ("#c62828", "✗"),
    "error": ("#ef6c00", "!"),
    "skipped": ("#9e9e9e", "-"),
}
MISSING = ("#eeeeee", "")


def junit_xml(name: str, verdict: str, message: str, results: list[TestResult]) -> bytes:
    """JUnit XML for a submission: its tests, or one error case naming the verdict."""
    suite = ET.Element("testsuite", name=name, tests=str(max(1, len(results))))
    for r in results:
        module, _, test = r.test_id.rpartition("::")
        case = ET.SubElement(suite, "testcase", classname=module, name=test)
        if r.outcome in ("failed", "error", "skipped"):
            tag = {"failed": "failure"}.get(r.outcome, r.outcome)
            ET.SubElement(case, tag, message=r.message).text = r.output
    if not results:
        case = ET.SubElement(suite, "testcase", classname=name, name="grading")
        ET.SubElement(case, "error", message=f"{verdict}: {message}")
    root = ET.Element("testsuites")
    root.append(suite)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def gradescope(sub: Mapping[str, Any]) -> dict[str, Any]:
    """One submission's Gradescope results.json."""
    tests = []
    for r in sub.get("results", []):
        visible = not r["hidden"]
        output = "\n".join(p for p in (r["message"], r["output"]) if p) if visible else ""
        tests.append(
            {
                "name": r["test_id"],
                "score": r["score"],
                "max_score": r["max_score"],
                "status": "passed" if r["outcome"] == "passed" else "failed",
                "output": output,
                "visibility": "visible" if visible else "hidden",
            }
        )
    result: dict[str, Any] = {
        "score": sub.get("points", 0.0),
        "execution_time": round(sub.get("wall_seconds", 0.0)),
        "output": f"{sub['verdict']}: {sub['message']}",
        "visibility": "visible",
        "stdout_visibility": "hidden",
        "tests": tests,
    }
    if not tests:
        # Without tests Gradescope shows only the score: the message is why it is 0.
        result["tests"] = [
            {
                "name": "grading",
                "score": 0.0,
                "max_score": 0.0,
                "status": "failed",
                "output": result["output"],
                "visibility": "visible",
            }
        ]
    return result


def _cell_text(value: object) -> str:
    """A CSV cell that a spreadsheet will not run as a formula (names come from students)."""
    text = str(value)
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def gradebook_csv(document: Mapping[str, Any]) -> str:
    """One row per submission: score, verdict, what it cost."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for sub in document["submissions"]:
        max_score = sub.get("max_points", 0.0)
        points = sub.get("points", 0.0)
        row = [
            sub["name"],
            points,
            max_score,
            round(100 * points / max_score, 1) if max_score else 0.0,
            sub["verdict"],
            sub["passed"],
            sub["total"],
            sub["cpu_seconds"],
            sub["peak_memory_bytes"],
            sub["wall_seconds"],
            sub["message"],
        ]
        writer.writerow([_cell_text(v) for v in row])
    return out.getvalue()


def per_test_csv(document: Mapping[str, Any]) -> str:
    """One row per test of each submission: outcome, points, what it cost."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TEST_CSV_FIELDS)
    for sub in document["submissions"]:
        for r in sub.get("results", []):
            row = [
                sub["name"],
                r["test_id"],
                r["outcome"],
                r["score"],
                r["max_score"],
                r["hidden"],
                r.get("cpu_seconds", 0.0),
                r.get("peak_memory_bytes", 0),
                r["message"],
            ]
            writer.writerow([_cell_text(v) for v in row])
    return out.getvalue()


def _cost(r: Mapping[str, Any]) -> str:
    """ "CPU 0.12 s, peak 31 MiB", or "" when the runner did not measure the test."""
    cpu, peak = r.get("cpu_seconds", 0.0), r.get("peak_memory_bytes", 0)
    return f"CPU {cpu:.2f} s, peak {peak / (1 << 20):.0f} MiB" if cpu or peak else ""


# -- the HTML report ---------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th.test{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;font-weight:normal}
td.cell{width:1.6em;text-align:center;color:#fff;font-weight:bold}
td.num{text-align:right}
.bar{display:inline-block;height:.8em;background:#2e7d32}
pre{white-space:pre-wrap;max-width:70em;margin:.2em 0;background:#f6f6f6;padding:4px}
.legend span{display:inline-block;padding:0 .6em;color:#fff;margin-right:.4em}
"""


def _test_ids(submissions: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({r["test_id"] for s in submissions for r in s.get("results", [])})


def _matrix(submissions: Sequence[Mapping[str, Any]], tests: list[str]) -> list[str]:
    e = html.escape
    rows = ["<table><tr><th>submission</th><th>score</th><th>verdict</th>"]
    rows += [f'<th class="test" title="{e(t)}">{e(t)}</th>' for t in tests]
    rows.append("</tr>")
    for sub in submissions:
        by_test = {r["test_id"]: r for r in sub.get("results", [])}
        rows.append(
            f"<tr><td>{e(sub['name'])}</td>"
            f'<td class="num">{sub.get("points", 0):g} / {sub.get("max_points", 0):g}</td>'
            f'<td title="{e(sub["message"])}">{e(sub["verdict"])}</td>'
        )
        for t in tests:
            r = by_test.get(t)
            colour, symbol = CELLS.get(r["outcome"], MISSING) if r else MISSING
            tip = e(f"{t}: {r['outcome']} {r['message']} {_cost(r)}" if r else f"{t}: not run")
            rows.append(f'<td class="cell" style="background:{colour}" title="{tip}">{symbol}</td>')
        rows.append("</tr>")
    rows.append("</table>")
    return rows


def _pass_rates(submissions: Sequence[Mapping[str, Any]], tests: list[str]) -> list[str]:
    e = html.escape
    rows = ["<table><tr><th>test</th><th>points</th><th>passed</th><th>rate</th></tr>"]
    for t in tests:
        results = [r for s in submissions for r in s.get("results", []) if r["test_id"] == t]
        passed = sum(1 for r in results if r["outcome"] == "passed")
        rate = passed / len(submissions) if submissions else 0.0
        worth = max((r["max_score"] for r in results), default=0.0)
        hidden = " (hidden)" if any(r["hidden"] for r in results) else ""
        rows.append(
            f"<tr><td>{e(t)}{hidden}</td><td class='num'>{worth:g}</td>"
            f"<td class='num'>{passed} / {len(submissions)}</td>"
            f"<td><span class='bar' style='width:{100 * rate:.0f}px'></span> "
            f"{100 * rate:.0f}%</td></tr>"
        )
    rows.append("</table>")
    return rows


def _failures(submissions: Sequence[Mapping[str, Any]]) -> list[str]:
    e = html.escape
    out: list[str] = []
    for sub in submissions:
        bad = [r for r in sub.get("results", []) if r["outcome"] != "passed"]
        if not bad and sub["verdict"] == "passed":
            continue
        out.append(f"<h3>{e(sub['name'])}: {e(sub['verdict'])}</h3><pre>{e(sub['message'])}</pre>")
        for r in bad:
            cost = f" ({_cost(r)})" if _cost(r) else ""
            out.append(f"<p><b>{e(r['test_id'])}</b>: {e(r['outcome'])}{e(cost)}</p>")
            text = "\n".join(p for p in (r["message"], r["output"]) if p)
            if text:
                out.append(f"<pre>{e(text)}</pre>")
    return out


def html_report(document: Mapping[str, Any]) -> str:
    """The whole report as one HTML page."""
    subs = document["submissions"]
    tests = _test_ids(subs)
    legend = "".join(f'<span style="background:{c}">{s} {e}</span>' for e, (c, s) in CELLS.items())
    legend += f'<span style="background:{MISSING[0]};color:#222">not run</span>'

    image = document.get("image", {}).get("digest", "")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">",
        f"<title>Grading report</title><style>{STYLE}</style></head><body>",
        f"<h1>Grading report</h1><p>{len(subs)} submissions, {len(tests)} tests; "
        f"image {html.escape(str(image))}</p>",
        f"<p class='legend'>{legend}</p>",
        "<h2>Submissions &times; tests</h2>",
        *_matrix(subs, tests),
        "<h2>Pass rate per test</h2>",
        *_pass_rates(subs, tests),
        "<h2>Failures</h2>",
        *_failures(subs),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_reports(document: Mapping[str, Any], directory: Path) -> list[Path]:
    """gradebook.csv, report.html and a Gradescope results.json per submission."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for sub in document["submissions"]:
        path = directory / "gradescope" / sub["name"] / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(gradescope(sub), indent=2) + "\n")
        written.append(path)
    for name, text in (
        ("gradebook.csv", gradebook_csv(document)),
        ("tests.csv", per_test_csv(document)),
        ("report.html", html_report(document)),
    ):
        (directory / name).write_text(text, encoding="utf-8")
        written.append(directory / name)
    return written

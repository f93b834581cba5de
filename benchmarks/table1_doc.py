"""Keeps docs/RESULTS.md's tables equal to the stored Table 1 report.

docs/RESULTS.md quotes parts of benchmarks/results/table1_v2/table1.md (the aggregate the Table 1
driver writes) between marker comments, `<!-- table1:NAME -->` ... `<!-- /table1:NAME -->`:

    crops       the table of the 64 crops of 32 px (the old protocol's evaluation, kept beside)
    validation  the table of the validation photos (128 px)
    test        the table of the test photos (128 px): the reported result
    claims      the paper's claims checked on seed means with their intervals
    seeds       the line saying which seeds the values are over
    paper       the paper's Table 1 as the report prints it (`table1.PAPER_TABLE1`)

    python benchmarks/table1_doc.py           # rewrite the quoted blocks in place
    python benchmarks/table1_doc.py --check   # exit 1 if the doc differs from the report

Hand-written text outside the markers is left alone; a test runs the check, so a re-run whose
numbers were not carried into the doc fails CI.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "benchmarks", "results", "table1_v2", "table1.md")
DOC = os.path.join(ROOT, "docs", "RESULTS.md")
BLOCK = re.compile(r"(<!-- table1:(\w+) -->\n)(.*?)(<!-- /table1:\2 -->)", re.S)


def _table_after(lines: list[str], start: int) -> str:
    """The first Markdown table at or after line `start`."""
    i = start
    while i < len(lines) and not lines[i].startswith("|"):
        i += 1
    j = i
    while j < len(lines) and lines[j].startswith("|"):
        j += 1
    if i == j:
        raise ValueError(f"no table after line {start + 1} of the report")
    return "\n".join(lines[i:j]) + "\n"


def _index(lines: list[str], prefix: str) -> int:
    for i, line in enumerate(lines):
        if line.startswith(prefix):
            return i
    raise ValueError(f"the report has no line starting {prefix!r}")


def sections(report: str) -> dict[str, str]:
    """The quotable parts of a table1.md, by block name."""
    lines = report.splitlines()
    claims_at = _index(lines, "The paper's claims on this run")
    claims = []
    for line in lines[claims_at + 1:]:
        if not line.strip():
            if claims:
                break
            continue
        if not line.startswith("- "):
            break
        claims.append(line)
    return {
        "crops": _table_after(lines, 1),
        "validation": _table_after(lines, _index(lines, "On the validation photos")),
        "test": _table_after(lines, _index(lines, "On the test photos")),
        "claims": "\n".join(claims) + "\n",
        "seeds": lines[_index(lines, "Seeds:")] + "\n",
        "paper": _table_after(lines, _index(lines, "Paper Table 1")),
    }


def render(doc: str, report: str) -> str:
    """`doc` with every marked block replaced by the report's section of that name."""
    parts = sections(report)
    unknown = sorted({m.group(2) for m in BLOCK.finditer(doc)} - parts.keys())
    if unknown:
        raise ValueError(f"docs/RESULTS.md marks unknown blocks {unknown}; known: {sorted(parts)}")
    return BLOCK.sub(lambda m: m.group(1) + parts[m.group(2)] + m.group(4), doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--report", default=REPORT)
    ap.add_argument("--doc", default=DOC)
    args = ap.parse_args(argv)
    with open(args.report) as f:
        report = f.read()
    with open(args.doc) as f:
        doc = f.read()
    new = render(doc, report)
    if args.check:
        if new != doc:
            print(f"{args.doc} does not quote {args.report}: run python benchmarks/table1_doc.py")
            return 1
        print(f"{args.doc} quotes {args.report}")
        return 0
    tmp = args.doc + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, args.doc)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

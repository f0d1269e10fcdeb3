#!/usr/bin/env python3
"""Prints, from aq-bench's JSON lines, one work beside another run by run in each mode, their
medians and the ratio of their rates (scripts/bench-batch, scripts/bench-chain).

usage: bench_pair_table.py RUNS.jsonl BASE_LABEL OTHER_LABEL BASE_UNITS BASE_UNIT OTHER_UNITS OTHER_UNIT
       (units plural, then singular: tasks task children child)
"""
import json
import statistics
import sys

path, base, other, base_units, base_unit, other_units, other_unit = sys.argv[1:8]
runs = [json.loads(line) for line in open(path) if line.strip()]
for mode in dict.fromkeys(r["mode"] for r in runs if r["label"] in (base, other)):
    a = [r for r in runs if r["label"] == base and r["mode"] == mode]
    b = [r for r in runs if r["label"] == other and r["mode"] == mode]
    if not a or not b:
        continue
    extra = any("report_after_last_callback_ms" in r for r in b)
    print(f"\n{mode}:\n")
    head = f"| round | {base_units}/s | bridge CPU per {base_unit} | {other_units}/s | bridge CPU per {other_unit} | ratio |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: |"
    if extra:
        head += " report after the last callback | peak RSS |"
        rule += " ---: | ---: |"
    print(head)
    print(rule)

    def row(name, x, y):
        line = (f"| {name} | {x['tasks_per_s']:,.0f} | {x['cpu_us_per_task']:.0f} µs | {y['tasks_per_s']:,.0f} | "
                f"{y['cpu_us_per_task']:.0f} µs | {y['tasks_per_s'] / x['tasks_per_s']:.0%} |")
        if extra:
            line += f" {y.get('report_after_last_callback_ms', 0):,.0f} ms | {y['peak_rss_mb']:.1f} MB |"
        print(line)

    for i, (x, y) in enumerate(zip(a, b), 1):
        row(str(i), x, y)
    keys = ["tasks_per_s", "cpu_us_per_task", "report_after_last_callback_ms", "peak_rss_mb"]
    med = lambda rs: {k: statistics.median(r.get(k, 0) for r in rs) for k in keys}
    x, y = med(a), med(b)
    ratios = [q["tasks_per_s"] / p["tasks_per_s"] for p, q in zip(a, b)]
    row("median", x, y)
    print(f"\nratio of the medians: {y['tasks_per_s'] / x['tasks_per_s']:.0%}; median of the round ratios: {statistics.median(ratios):.0%}")

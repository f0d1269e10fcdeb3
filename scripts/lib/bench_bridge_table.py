#!/usr/bin/env python3
"""Prints scripts/bench-bridge's table from aq-bench's JSON lines: medians per bridge and mode."""
import json
import statistics
import sys

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
labels = ["aq-bridge", "cbridge"]
names = {"aq-bridge": "aq-bridge", "cbridge": "C limit bridge"}
present = [l for l in labels if any(r["label"] == l for r in runs)]


def med(label, mode, key, rate=None, sub=None):
    values = []
    for r in runs:
        if r["label"] != label or r["mode"] != mode or (rate is not None and round(r.get("rate", 0)) != rate):
            continue
        v = r[key][sub] if sub else r[key]
        if v is not None:
            values.append(v)
    return statistics.median(values) if values else None


def row(title, label_values, fmt, ratio=None):
    cells = [fmt(v) if v is not None else "–" for v in label_values]
    if len(label_values) == 2 and ratio and None not in label_values and label_values[1]:
        cells.append(ratio(label_values[0], label_values[1]))
    elif len(present) == 2:
        cells.append("")
    print("| " + " | ".join([title] + cells) + " |")


count = {m: max((r["tasks"] for r in runs if r["mode"] == m), default=0) for m in ("preload", "live", "rate")}
head = ["", *[names[l] for l in present]] + (["ratio"] if len(present) == 2 else [])
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
pct = lambda a, b: f"{100 * a / b:.0f}%"
times = lambda a, b: f"{a / b:.2f}×"
for mode in ("preload", "live"):
    row(f"{mode}: tasks/s ({count[mode]} tasks)", [med(l, mode, "tasks_per_s") for l in present], lambda v: f"{v:,.0f}", pct)
    row(f"{mode}: bridge CPU per task", [med(l, mode, "cpu_us_per_task") for l in present], lambda v: f"{v:.0f} µs", times)
row("peak RSS (preload, prefetch 512)", [med(l, "preload", "peak_rss_mb") for l in present], lambda v: f"{v:.1f} MB", times)
if any(r["label"].endswith("-10k") for r in runs):
    row("peak RSS, 10,000 tasks in flight", [med(l + "-10k", "preload", "peak_rss_mb") for l in present], lambda v: f"{v:.1f} MB", times)
rates = sorted({round(r["rate"]) for r in runs if r["mode"] == "rate"})
for rate in rates:
    for key, title in (("confirmed_to_callback_ms", "confirmed → callback"), ("callback_to_webhook_ms", "callback → webhook")):
        vals = []
        for l in present:
            parts = [med(l, "rate", key, rate, p) for p in ("p50", "p99", "p999")]
            vals.append(None if None in parts else parts)
        cells = [" / ".join(f"{x:.2f}" for x in v) + " ms" if v else "–" for v in vals]
        extra = []
        if len(present) == 2:
            extra = [f"p99 {vals[0][1] / vals[1][1]:.2f}×" if None not in vals and vals[1][1] else ""]
        print("| " + " | ".join([f"{rate}/s: {title} p50 / p99 / p99.9"] + cells + extra) + " |")
left = sum(r["left_in_queue"] for r in runs)
stray = sum(r["stray_requests"] for r in runs)
print(f"\n{len(runs)} runs; tasks left in the queue after them: {left}; unexpected sink requests: {stray}")

#!/usr/bin/env python3
"""Joins the C++ bench's JSON (bench.cpp) and the PyTorch anchors' JSON
(anchors.py) into one table of samples/s and ratios, multigpu / PyTorch.

  compare.py --bench RESULTS/bench-1.json ... --anchors RESULTS/anchors-1.json ... [--output RESULTS/compare.md]

Several runs (run.sh alternates the two sides on a CPU) are pooled: each
figure is the median over every round of every run, and each pair's ratio
is also given run by run, so that the spread shows how much a shared machine
moved under the measurement.

For each model: every contender of the C++ bench and every PyTorch runner
with its samples/s, then each C++ contender's samples/s over each runner's
(above 1: the C++ side trains faster). The like-for-like pairs come first, in
"Pairs": plain LibTorch and DataParallel(1) against eager PyTorch;
DataParallel(K) against DDP with K processes (on a CPU: K replicas in one
process against K processes with Gloo; on GPUs: one replica per GPU against
one process per GPU); DataParallel(1) against nn.DataParallel on one GPU.
Needs only the standard library. Exits with 1 when the two runs disagree on a
model's parameter count or batch size (the ratio would mean nothing).
"""
import argparse
import json
import statistics
import sys

# The ring all-reduce cost model for 8 x H100 SXM over NVLink 4 / NVSwitch
# (docs/performance.md states the assumptions and cites the figures):
# time = 2(n-1)/n x bytes / bus bandwidth, fp32 gradients (4 bytes a parameter).
RING_GPUS = 8
BUS_GBPS = {"NCCL ring, effective": 370.0, "NVLink 4 line rate, one direction": 450.0}


def ring_allreduce_ms(parameters, gpus=RING_GPUS, bus_gbps=450.0):
    return 1e3 * 2 * (gpus - 1) / gpus * 4 * parameters / (bus_gbps * 1e9)


def load(path):
    with open(path) as f:
        return json.load(f)


def pairs_for(cxx, py):
    """(C++ contender, PyTorch runner label, what the pair measures) for the like-for-like pairs of one model."""
    out = []
    by_contender = {e["contender"]: e for e in cxx}
    for p in py:
        if p["runner"] == "eager":
            for c in ("plain LibTorch", "DataParallel(1)"):
                if c in by_contender:
                    out.append((c, p["label"], "the same step, C++ against Python"))
        if p["runner"] == "dataparallel" and "DataParallel(1)" in by_contender and p["label"].startswith(
                "nn.DataParallel(1 "):
            out.append(("DataParallel(1)", p["label"], "the data-parallel wrappers on one GPU"))
        if p["runner"] == "ddp":
            c = f"DataParallel({p['processes']})"
            if c in by_contender:
                what = ("K replicas in one process against K processes" if p["device"] == "cpu"
                        else "one replica per GPU against one process per GPU")
                out.append((c, p["label"], what))
    return out


def ring_model_section(bench, steps, models):
    """The all-reduce time per step on 8 x H100, and with a GPU run the 8-GPU step it implies."""
    gpu = bench["machine"]["devices"] != ["cpu"]
    names = list(BUS_GBPS)
    head = "| model | parameters | gradient MB | " + " | ".join(f"all-reduce ms at {BUS_GBPS[n]:.0f} GB/s ({n})"
                                                            for n in names) + " |"
    text = (f"time = 2(n-1)/n x gradient bytes / bus bandwidth, n = {RING_GPUS}, fp32 gradients; latency left out "
            "(see docs/performance.md).")
    if gpu:
        text += (" The 8-GPU step: this run's DataParallel(1) step (the same batch on each GPU) plus the whole "
                 "all-reduce at 370 GB/s (none of it hidden behind backward); with all of it hidden, the step stays "
                 "DataParallel(1)'s.")
    lines = [f"## Ring all-reduce model, {RING_GPUS} x H100 (NVLink 4)", "", text, ""]
    if gpu:
        head += " DataParallel(1) ms | 8-GPU step ms, none hidden (370 GB/s) | 8-GPU samples/s, none hidden |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for model in models:
        entries = [e for e in steps if e["model"] == model]
        p = entries[0]["parameters"]
        row = f"| {model} | {p} | {4 * p / 1e6:.2f} | " + " | ".join(
            f"{ring_allreduce_ms(p, bus_gbps=BUS_GBPS[n]):.3f}" for n in names) + " |"
        if gpu:
            one = next((e for e in entries if e["contender"] == "DataParallel(1)"), None)
            if one:
                step = one["step_ms"] + ring_allreduce_ms(p, bus_gbps=BUS_GBPS[names[0]])
                row += f" {one['step_ms']:.3f} | {step:.3f} | {RING_GPUS * 1e3 * one['batch_size'] / step:.0f} |"
            else:
                row += " | | |"
        lines.append(row)
    return lines + [""]


def pooled(runs, key):
    """Entries of several runs merged by (model, key): every round of every run, one median.

    Each merged entry keeps the first run's fields, with `round_step_ms` holding all
    rounds, `step_ms` and `samples_per_second` from their median, and
    `per_run_samples_per_second` the figure of each run on its own.
    """
    merged = {}
    for run in runs:
        for e in run:
            k = (e["model"], e[key])
            if k not in merged:
                merged[k] = dict(e, round_step_ms=[], per_run_samples_per_second=[], mismatch=[])
            m = merged[k]
            if (e["batch_size"], e["parameters"]) != (m["batch_size"], m["parameters"]):
                m["mismatch"].append(f"batch {e['batch_size']}, {e['parameters']} parameters")
            m["round_step_ms"] += e["round_step_ms"]
            m["per_run_samples_per_second"].append(e["samples_per_second"])
    for m in merged.values():
        m["step_ms"] = statistics.median(m["round_step_ms"])
        m["samples_per_second"] = 1000.0 * m["batch_size"] / m["step_ms"]
    return list(merged.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", nargs="+", required=True, help="the C++ bench's JSON, one a run")
    parser.add_argument("--anchors", nargs="+", required=True, help="anchors.py's JSON, one a run, in the same order")
    parser.add_argument("--output", help="write the markdown here (and the ratios as JSON next to it)")
    args = parser.parse_args()
    if len(args.bench) != len(args.anchors):
        parser.error(f"{len(args.bench)} bench runs and {len(args.anchors)} anchor runs: give them in pairs")
    benches, anchor_runs = [load(p) for p in args.bench], [load(p) for p in args.anchors]
    bench, anchors = benches[0], anchor_runs[0]
    cxx_all = pooled([b.get("steps", []) for b in benches], "contender")
    py_all = pooled([a["results"] for a in anchor_runs], "label")
    runs = len(benches)

    models = []
    for e in cxx_all:
        if e["model"] not in models:
            models.append(e["model"])
    problems = [f"{e['model']}, {e.get('contender', e.get('label'))}: runs differ ({'; '.join(e['mismatch'])})"
                for e in cxx_all + py_all if e["mismatch"]]
    ratios = []
    md = ["# multigpu against PyTorch", ""]
    m = bench["machine"]
    a = anchors["machine"]
    loads = ", ".join(f"{b['machine'].get('load_average', '?')} / {r['machine'].get('load_average', '?')}"
                      for b, r in zip(benches, anchor_runs))
    md.append(f"C++: {m['cpu']}, {m['hardware_threads']} hardware threads, LibTorch {m['libtorch']}, "
              f"devices {', '.join(m['devices'])}, intra-op threads {m['torch_intraop_threads']}. "
              f"PyTorch: torch {a['torch']} (Python {a['python']}) on {a.get('gpu', a['device'])}.")
    md.append(f"{runs} run{'s' if runs > 1 else ''} of the C++ bench and then the anchors, one after the other, "
              f"from {bench['date']} to {anchor_runs[-1]['date']}; load average at the start of each "
              f"(bench / anchors): {loads}.")
    s = bench.get("settings", {})
    md.append(f"Each figure: the median over all rounds of all runs ({runs} x {s.get('rounds')} rounds of "
              f"{s.get('steps')} steps, after {s.get('warmup')} warm-up steps); samples/s counts the whole batch. "
              "Ratio = multigpu (C++) samples/s / PyTorch samples/s; \"per run\" gives each run's own ratio, "
              "whose spread shows how much the machine moved under the measurement.")
    if bench.get("quick") or anchors.get("quick"):
        md.append("")
        md.append("**Quick run: too few steps to measure anything; it only shows that the pipeline works.**")
    md.append("")

    md += ["## Pairs", "", "| model | batch | multigpu | PyTorch | ratio | per run | what it compares |",
           "|---|---|---|---|---|---|---|"]
    tables = []
    for model in models:
        cxx = [e for e in cxx_all if e["model"] == model]
        py = [e for e in py_all if e["model"] == model]
        if not py:
            continue
        for p in py:
            if p["parameters"] != cxx[0]["parameters"]:
                problems.append(f"{model}: {cxx[0]['parameters']} parameters in C++, {p['parameters']} in Python")
            if p["batch_size"] != cxx[0]["batch_size"]:
                problems.append(f"{model}: batch {cxx[0]['batch_size']} in C++, {p['batch_size']} in Python "
                                f"({p['label']})")
        by_label = {p["label"]: p for p in py}
        by_contender = {c["contender"]: c for c in cxx}
        for contender, label, what in pairs_for(cxx, py):
            c, p = by_contender[contender], by_label[label]
            r = c["samples_per_second"] / p["samples_per_second"]
            per_run = [x / y for x, y in zip(c["per_run_samples_per_second"], p["per_run_samples_per_second"])]
            ratios.append({"model": model, "multigpu": contender, "pytorch": label, "ratio": r, "per_run": per_run,
                           "what": what})
            md.append(f"| {model} | {cxx[0]['batch_size']} | {contender} | {label} | {r:.3f} | "
                      f"{', '.join(f'{x:.2f}' for x in per_run)} | {what} |")

        table = [f"### {model} (batch {cxx[0]['batch_size']}, {cxx[0]['parameters']} parameters)", "",
                 "| runner | samples/s | " + " | ".join(f"/ {p['label']}" for p in py) + " |",
                 "|---|---|" + "---|" * len(py)]
        for c in cxx:
            cells = [f"{c['samples_per_second'] / p['samples_per_second']:.3f}" for p in py]
            table.append(f"| {c['contender']} (C++) | {c['samples_per_second']:.1f} | " + " | ".join(cells) + " |")
        for p in py:
            table.append(f"| {p['label']} (Python) | {p['samples_per_second']:.1f} |" + " |" * len(py))
        tables += table + [""]
    md += ["", "## Every contender against every anchor", ""] + tables
    md += ring_model_section(bench, cxx_all, models)
    if problems:
        md += ["## The runs disagree", ""] + [f"- {p}" for p in problems] + [""]
    text = "\n".join(md)
    print(text)
    if args.output:
        with open(args.output, "w") as out:
            out.write(text + "\n")
        base = args.output[:-3] if args.output.endswith(".md") else args.output
        with open(base + ".json", "w") as out:
            json.dump({"bench": args.bench, "anchors": args.anchors, "pairs": ratios, "problems": problems}, out,
                      indent=2)
            out.write("\n")
    if problems:
        print("compare.py: the runs disagree: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

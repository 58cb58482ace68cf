#!/usr/bin/env bash
# Draws a benchmark result (the JSON that `bench` writes) as a PNG: training
# throughput against the number of replicas, and all-reduce / copy bandwidth
# against message size.
#
#   benchmarks/plot.sh benchmarks/results/cpu-2core-20261122.json   # writes ...json -> ...png
#
# Needs gnuplot (Debian: gnuplot-nox) and python3 (to read the JSON).
set -euo pipefail
if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 RESULT.json [OUTPUT.png]" >&2
  exit 2
fi
input="$1"
output="${2:-${input%.json}.png}"
command -v gnuplot >/dev/null || { echo "$0: gnuplot is missing (apt-get install gnuplot-nox)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "$0: python3 is missing (it reads the JSON)" >&2; exit 1; }
[[ -f "$input" ]] || { echo "$0: no such file: $input" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# JSON -> one whitespace-separated table per panel, plus the size labels.
python3 - "$input" "$work" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
work = sys.argv[2]
title = "{} ({} hardware threads, LibTorch {}), {}".format(
    report["machine"]["cpu"], report["machine"]["hardware_threads"], report["machine"]["libtorch"], report["date"])
open(work + "/title", "w").write(title)
models = []
with open(work + "/steps.dat", "w") as out:
    for entry in report.get("steps", []):
        if not entry["contender"].startswith("DataParallel"):
            continue  # the plain loop is the 1.0 line
        if entry["model"] not in models:
            models.append(entry["model"])
            if len(models) > 1:
                out.write("\n\n")  # a gnuplot data block per model
            out.write("# {}\n".format(entry["model"]))
        out.write("{} {}\n".format(entry["replicas"], 1.0 / entry["ratio_to_plain"]))
open(work + "/models", "w").write(" ".join(models))
series = {}
for entry in report.get("bandwidth", []):
    series.setdefault("copy", []).append((entry["bytes"], entry["copy_gbps"]))
    for b in entry["allreduce"]:
        name = "{} all-reduce K={}".format(b["backend"], b["replicas"])
        series.setdefault(name, []).append((entry["bytes"], b["algbw_gbps"]))
names = list(series)
with open(work + "/bandwidth.dat", "w") as out:
    for i, name in enumerate(names):
        if i:
            out.write("\n\n")
        for size, gbps in series[name]:
            out.write("{} {}\n".format(size / 1024.0, gbps))
open(work + "/series", "w").write("\n".join(names))
def label(kib):
    return "{:g}K".format(kib) if kib < 1024 else "{:g}M".format(kib / 1024)
sizes = sorted({entry["bytes"] / 1024.0 for entry in report.get("bandwidth", [])})
open(work + "/xtics", "w").write(", ".join('"{}" {}'.format(label(k), k) for k in sizes))
EOF

models=($(cat "$work/models"))
mapfile -t series < "$work/series"
steps_plot=""
for i in "${!models[@]}"; do
  steps_plot+="${steps_plot:+, }'$work/steps.dat' index $i using 1:2 with linespoints lw 2 title '${models[$i]}'"
done
bandwidth_plot=""
for i in "${!series[@]}"; do
  bandwidth_plot+="${bandwidth_plot:+, }'$work/bandwidth.dat' index $i using 1:2 with linespoints lw 2 title '${series[$i]}'"
done

gnuplot <<EOF
set terminal pngcairo size 1400,560 font ",11"
set output '$output'
set multiplot layout 1,2 title "multigpu benchmarks: $(cat "$work/title")"
set grid
set key top left
set title 'DataParallel training speed-up over a plain LibTorch loop'
set xlabel 'replicas'
set ylabel 'x plain (samples/s ratio)'
set xtics 1
set yrange [0:*]
$( [[ -n "$steps_plot" ]] && echo "plot $steps_plot, 1 with lines dt 2 lc rgb 'gray' title 'plain loop'" || echo "unset key; plot 0 notitle" )
set title 'All-reduce (algbw) and copy bandwidth'
set xlabel 'message size'
set ylabel 'GB/s'
set logscale x 2
set logscale y
set autoscale y
set xtics ($(cat "$work/xtics"))
set offsets graph 0.03, graph 0.03, 0, 0
$( [[ -n "$bandwidth_plot" ]] && echo "plot $bandwidth_plot" || echo "unset key; plot 1 notitle" )
unset multiplot
EOF
echo "wrote $output"

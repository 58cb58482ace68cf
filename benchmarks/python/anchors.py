#!/usr/bin/env python3
"""PyTorch anchors for multigpu's benchmark: the models of models.py, trained
with the same batches and optimizer (SGD, lr 0.01, momentum 0.9) through

  eager            plain eager PyTorch in this process (zero_grad, forward, backward, step),
                   with the C++ bench's intra-op threads (--threads);
  dataparallel     torch.nn.DataParallel over the visible GPUs (GPUs only: on a CPU
                   it would only call the module);
  ddp              DistributedDataParallel, started here with torch.multiprocessing:
                   NCCL, one process per GPU (world size 1 on a one-GPU machine);
                   on a CPU Gloo, 2 processes, each with cores / 2 intra-op threads
                   (--threads-per-process; torchrun would give each OMP_NUM_THREADS=1).

Timing follows bench.cpp: warm-up steps, then rounds of steps; the device is
synchronised at the end of each round only, no loss is read, and each runner's
figure is the median over rounds of ms per step. eager and dataparallel take
turns round by round; ddp runs in its own processes afterwards. samples/s
counts the whole batch (all processes together for ddp).

  anchors.py --from-bench RESULTS/bench-1.json --output RESULTS/anchors-1.json

--from-bench takes the models, batch sizes, device kind, warm-up, rounds and
steps from the C++ bench's JSON, and refuses to run a model whose parameter
count differs from the C++ one.
"""
import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # the anchors need no NumPy
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402

SGD = dict(lr=0.01, momentum=0.9)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, data, target):
    optimizer = torch.optim.SGD(model.parameters(), **SGD)

    def step():
        optimizer.zero_grad()
        models.cross_entropy(model(data), target).backward()
        optimizer.step()

    return step


def time_rounds(runners, device, warmup, rounds, steps):
    """Runs each (name, step) for warm-up steps, then `rounds` interleaved rounds; ms per step by name."""
    for _, step in runners:
        for _ in range(warmup):
            step()
        synchronize(device)
    times = {name: [] for name, _ in runners}
    for r in range(rounds):
        for turn in range(len(runners)):
            name, step = runners[(turn + r) % len(runners)]
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            times[name].append(1000.0 * (time.perf_counter() - start) / steps)
    return times


def in_process(name, batch_size, device, runner_names, settings):
    data, target = models.make_batch(name, batch_size)
    data, target = data.to(device), target.to(device)
    runners = []
    if "eager" in runner_names:
        runners.append(("eager", make_step(models.make_model(name).to(device), data, target)))
    if "dataparallel" in runner_names and device.type == "cuda":
        wrapped = torch.nn.DataParallel(models.make_model(name).to(device))
        runners.append(("dataparallel", make_step(wrapped, data, target)))
    if not runners:
        return {}
    return time_rounds(runners, device, settings["warmup"], settings["rounds"], settings["steps"])


def ddp_worker(rank, world, backend, port, work, threads, settings, result_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results = {}
    for name, batch_size in work:
        data, target = models.make_batch(name, batch_size)
        # The shards multigpu makes: consecutive, sizes differing by one at most.
        data = torch.tensor_split(data, world)[rank].to(device)
        target = torch.tensor_split(target, world)[rank].to(device)
        model = torch.nn.parallel.DistributedDataParallel(
            models.make_model(name).to(device), device_ids=[rank] if device.type == "cuda" else None)
        step = make_step(model, data, target)
        for _ in range(settings["warmup"]):
            step()
        synchronize(device)
        times = []
        for _ in range(settings["rounds"]):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(settings["steps"]):
                step()
            synchronize(device)
            times.append(1000.0 * (time.perf_counter() - start) / settings["steps"])
        results[name] = times
        del model, step
    if rank == 0:
        with open(result_path, "w") as out:
            json.dump(results, out)
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(work, device, world, settings, threads):
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not threads:
        threads = max(1, (os.cpu_count() or 1) // world) if device.type == "cpu" else torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ddp.json")
        mp.spawn(ddp_worker, args=(world, backend, free_port(), work, threads, settings, path), nprocs=world, join=True)
        with open(path) as f:
            return json.load(f), backend, threads


def parse_batches(items, names):
    out = {}
    for item in items:
        if "=" not in item:
            out.update({n: int(item) for n in names})
            continue
        name, size = item.split("=", 1)
        if name not in models.WORKLOADS:
            sys.exit(f"anchors.py: --batch {item}: no model called {name}; models: {','.join(models.WORKLOADS)}")
        out[name] = int(size)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-bench", help="the C++ bench's JSON: models, batches, device kind and settings from it")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                        help="default: the bench's device kind with --from-bench, else auto")
    parser.add_argument("--models",
                        help="comma-separated; default: the bench's, else those models.py times on this device")
    parser.add_argument("--batch", default="", help="N, or model=N,... (default: the bench's, else models.py's)")
    parser.add_argument("--runners", default="eager,dataparallel,ddp")
    parser.add_argument("--world-size", type=int, default=0, help="DDP processes (default: GPUs on a GPU, 2 on a CPU)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads in this process (default: the bench's with --from-bench, else torch's)")
    parser.add_argument("--threads-per-process", type=int, default=0,
                        help="intra-op threads of each DDP process on a CPU (default: cores / world size, at least 1)")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--quick", action="store_true",
                        help="a few steps at a quarter of the batch: checks that it runs")
    parser.add_argument("--output", required=True, help="where the JSON goes")
    args = parser.parse_args()

    settings = {"warmup": 5, "rounds": 11, "steps": 10}
    bench_models, bench_batches, bench_parameters, device_kind, bench_threads = None, {}, {}, "auto", 0
    if args.from_bench:
        with open(args.from_bench) as f:
            bench = json.load(f)
        settings.update({k: bench["settings"][k] for k in settings})
        device_kind = "cpu" if bench["machine"]["devices"] == ["cpu"] else "cuda"
        bench_threads = bench["machine"]["torch_intraop_threads"]
        bench_models = []
        for entry in bench.get("steps", []):
            if entry["model"] not in bench_models:
                bench_models.append(entry["model"])
            bench_batches[entry["model"]] = entry["batch_size"]
            bench_parameters[entry["model"]] = entry["parameters"]
    if args.quick:
        settings = {"warmup": 1, "rounds": 2, "steps": 2}
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    device_kind = args.device or device_kind
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    if device_kind == "cuda" and not torch.cuda.is_available():
        sys.exit("anchors.py: the bench ran on GPUs (or --device cuda), and this torch sees none "
                 f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    device = torch.device("cuda", 0) if device_kind == "cuda" else torch.device("cpu")
    gpu = device.type == "cuda"

    if args.models:
        names = args.models.split(",")
    elif bench_models is not None:
        names = bench_models
    else:
        names = [n for n, w in models.WORKLOADS.items() if gpu or w[3]]
    for n in names:
        if n not in models.WORKLOADS:
            sys.exit(f"anchors.py: --models: {n} not in {{{','.join(models.WORKLOADS)}}}")
    batches = {n: models.WORKLOADS[n][1 if gpu else 2] for n in names}
    if args.quick:
        batches = {n: max(b // 4, 4) for n, b in batches.items()}
    batches.update({n: b for n, b in bench_batches.items() if n in batches})
    batches.update(parse_batches([b for b in args.batch.split(",") if b], names))
    runner_names = args.runners.split(",")
    world = args.world_size or (torch.cuda.device_count() if gpu else 2)

    parameters = {}
    for n in names:
        parameters[n] = models.parameter_count(models.make_model(n))
        note = ""
        if n in bench_parameters:
            if bench_parameters[n] != parameters[n]:
                sys.exit(f"anchors.py: {n} has {parameters[n]} parameters here and {bench_parameters[n]} in the C++ "
                         f"bench ({args.from_bench}): models.py and models.hpp disagree, the comparison would be void")
            note = " (the same as the C++ bench's)"
        print(f"{n}: {parameters[n]} parameters{note}, batch {batches[n]}", flush=True)

    if args.threads or bench_threads:
        torch.set_num_threads(args.threads or bench_threads)
    threads = torch.get_num_threads()
    results = []

    def record(name, runner, label, times, processes, threads_per_process, backend=None):
        ms = statistics.median(times)
        entry = {"model": name, "parameters": parameters[name], "batch_size": batches[name], "runner": runner,
                 "label": label, "processes": processes, "threads_per_process": threads_per_process,
                 "device": str(device), "step_ms": ms, "round_step_ms": times,
                 "samples_per_second": 1000.0 * batches[name] / ms}
        if backend:
            entry["backend"] = backend
        results.append(entry)
        print(f"  {name:<15} {label:<32} {ms:9.3f} ms/step {entry['samples_per_second']:9.0f} samples/s", flush=True)

    gpus = torch.cuda.device_count() if gpu else 0
    for n in names:
        times = in_process(n, batches[n], device, runner_names, settings)
        if "eager" in times:
            record(n, "eager", "eager PyTorch", times["eager"], 1, threads)
        if "dataparallel" in times:
            record(n, "dataparallel", f"nn.DataParallel({gpus} GPU{'s' if gpus > 1 else ''})", times["dataparallel"],
                   1, threads)
    if "ddp" in runner_names:
        ddp, backend, ddp_threads = run_ddp([(n, batches[n]) for n in names], device, world, settings,
                                            args.threads_per_process)
        for n in names:
            record(n, "ddp", f"DDP({backend}, {world} process{'es' if world > 1 else ''})", ddp[n], world,
                   ddp_threads, backend)

    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    machine = {"host": platform.node(), "cpu": cpu, "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
               "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "device": str(device)}
    if gpu:
        machine["gpu"] = torch.cuda.get_device_name(device)
    report = {"machine": machine, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "quick": args.quick, "settings": settings, "from_bench": args.from_bench, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as out:
        json.dump(report, out, indent=2)
        out.write("\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

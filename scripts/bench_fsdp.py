"""Sharded training step (train.fsdp): peak memory per GPU and time per optimizer step.

    torchrun --nproc_per_node 2 scripts/bench_fsdp.py --model llama-1b --methods lora,delta-lora \
        --batch 8 --length 512 --steps 20 --warmup 5                # peak memory (and times)
    torchrun --nproc_per_node 2 scripts/bench_fsdp.py ... --steps 40 --interleave   # time ratios
    torchrun --nproc_per_node 1 scripts/bench_fsdp.py ...            # one GPU, still sharded (1 way)
    torchrun --nproc_per_node 1 scripts/bench_fsdp.py --no-fsdp ...  # one GPU, the plain model

Each process builds the model (`--model`: a config of deltalora_repro/configs/model, random init
on its device), applies the method with E2E's settings (rank 4, alpha 32, lambda 2; K = 0, so
Delta-LoRA's deferred sum runs from the first step), shards it as a run with train.fsdp=true does
(sharding.shard) and runs the real optimizer step (Trainer.train_step: forward, backward, FSDP's
reduce-scatter, AdamW, the method's hooks) on synthetic token ids of length `--length`; `--batch`
is the global batch, split evenly over the processes. Time per step comes from CUDA events
recorded around every step and read once at the end (no host synchronisation inside the timed
steps; on the CPU, wall time). Peak memory is torch.cuda.max_memory_allocated in each process,
from after sharding (the unsharded model each process builds first is not counted; its size is
reported as `allocated_before_shard_bytes`). Writes one JSON record (machine, commit, versions,
command) to --out and prints a Markdown table.

Without --interleave the methods run one after another in the same processes, and on the eager,
host-bound sharded step the one measured second was the slower whichever it was (by up to 35% on
2 x H200): use that mode for memory, and --interleave (every method's model alive, steps taken in
turn, A B then B A) for the time ratio. Under --interleave each later method's row also carries
`paired_ratio_vs_first`: the ratio of its step to the first method's step of the same turn (each
step's time that of its slowest process), as median, 10th/90th percentiles and a 95% bootstrap
interval of the median over the turns; the more --steps, the narrower the interval.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("lora", "delta-lora")
# torch and the package load after the arguments are checked: a bad command line fails at once.


def bench_config(model: str, method: str, batch: int, precision: str, fsdp: bool):
    from deltalora_repro.config import compose
    delta = ["method.start_steps=0"] if method == "delta-lora" else []
    return compose(f"model={model}", "task=e2e", f"method={method}", "seed=0",
                   f"train.batch_size={batch}", f"train.precision={precision}",
                   "train.warmup_steps=0", "train.max_grad_norm=null", "train.epochs=1",
                   f"train.log_every={10 ** 9}", "train.cuda_graph=false", "train.compile=false",
                   f"train.fsdp={str(fsdp).lower()}", "method.lora_dropout=0.0", *delta)


def _prepare(model_name: str, method_name: str, world, batch: int, length: int,
             precision: str, total: int, fsdp: bool) -> dict:
    """One method's model, sharded, with its Trainer and `total` steps of synthetic batches."""
    import torch

    from deltalora_repro import sharding
    from deltalora_repro.bench import _SyntheticTask
    from deltalora_repro.build import build
    from deltalora_repro.models import load_backbone
    from deltalora_repro.train import StepBatches, Trainer
    device = world.device
    cfg = bench_config(model_name, method_name, batch, precision, fsdp)
    # Random init directly on the device: a 1B model initialised on the CPU takes minutes.
    with torch.device(device):
        net, tok, _ = load_backbone(cfg.model, "causal-lm", seed=cfg.seed)
        task = _SyntheticTask(net.config.vocab_size, classification=False, seq2seq=False)
        built = build(cfg, data=False, total_steps=total, task=task, model=(net, tok, {}))
    model, method = built.model.to(device), built.method
    prep = {"method_name": method_name, "method": method,
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": method.trainable_numel(model),
            "before": torch.cuda.memory_allocated(device) if device.type == "cuda" else None}
    if fsdp:
        sharding.shard(model, world)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prep["trainer"] = Trainer(model, method, task, cfg.train, world, cfg.seed, total)
    prep["trainer"].start()
    share = batch // world.size
    gen = torch.Generator().manual_seed(1000 + world.rank)       # each process its own rows
    prep["steps"] = []
    for _ in range(total):
        step = StepBatches([task.batch([length] * share, gen)])
        step.weights = [1.0 / world.size]                      # its share of the global mean
        prep["steps"].append(step)
    return prep


class _StepClock:
    """Time of each step: CUDA events around it, read once at the end (no host synchronisation
    between the timed steps); on the CPU, wall time."""

    def __init__(self, device):
        import torch
        self.torch, self.cuda, self.device, self.spans = torch, device.type == "cuda", device, []

    def mark(self):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, begin, end) -> None:
        self.spans.append((begin, end))

    def times_ms(self) -> list[float]:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in self.spans]
        return [1000 * (b - a) for a, b in self.spans]


def _row(prep: dict, model_name: str, world, batch: int, length: int, precision: str, steps: int,
         warmup: int, fsdp: bool, times: list[float], peak, interleaved: bool) -> dict:
    peaks = world.gather(peak)
    medians = world.gather(statistics.median(times))
    return {"model": model_name, "method": prep["method_name"], "fsdp": fsdp,
            "processes": world.size, "global_batch": batch, "length": length,
            "precision": precision, "delta_update": getattr(prep["method"], "update_mode", None),
            "params": prep["params"], "trainable": prep["trainable"], "steps": steps,
            "warmup": warmup, "interleaved": interleaved,
            # The slowest process sets the pace (every step ends in collectives).
            "step_ms_median": max(medians), "step_ms_median_per_process": medians,
            "step_ms_p10": statistics.quantiles(times, n=10)[0] if len(times) > 1 else times[0],
            "step_ms_p90": statistics.quantiles(times, n=10)[-1] if len(times) > 1 else times[0],
            "tokens_per_s": batch * length / (max(medians) / 1000),
            "peak_memory_bytes_per_process": peaks,
            "allocated_before_shard_bytes": prep["before"]}


def bench_one(model_name: str, method_name: str, world, batch: int, length: int,
              precision: str, steps: int, warmup: int, fsdp: bool,
              profile: Path | None = None) -> dict:
    """One method alone in the processes: its time per step and its peak memory."""
    import torch
    prep = _prepare(model_name, method_name, world, batch, length, precision, warmup + steps, fsdp)
    trainer, clock = prep["trainer"], _StepClock(world.device)
    for k, step in enumerate(prep["steps"]):
        if k == warmup:
            world.barrier()
        begin = clock.mark() if k >= warmup else None
        trainer.train_step(step)
        if begin is not None:
            clock.add(begin, clock.mark())
    times = clock.times_ms()
    cuda = world.device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(world.device) if cuda else None
    if profile is not None:       # after the measurements: the profiler's steps count in neither
        _profile(trainer, prep["steps"][-3:], profile, method_name, world)
    row = _row(prep, model_name, world, batch, length, precision, steps, warmup, fsdp, times, peak,
               interleaved=False)
    del trainer, prep
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def bench_interleaved(model_name: str, methods: list[str], world, batch: int, length: int,
                      precision: str, steps: int, warmup: int, fsdp: bool) -> list[dict]:
    """Every method's model at once, their steps taken in turn (A B A B ...): the same process
    state and the same moment for each, so their time ratio is not that of a method measured
    first against one measured second; the order within a turn alternates (A B, B A, ...). No
    memory figures (all models are alive); those come from the default mode."""
    preps = [_prepare(model_name, m, world, batch, length, precision, warmup + steps, fsdp)
             for m in methods]
    clocks = [_StepClock(world.device) for _ in preps]
    turns = list(zip(preps, clocks))
    for k in range(warmup + steps):
        if k == warmup:
            world.barrier()
        # A B, then B A: no method always runs right after another one.
        for prep, clock in (turns if k % 2 == 0 else turns[::-1]):
            begin = clock.mark() if k >= warmup else None
            prep["trainer"].train_step(prep["steps"][k])
            if begin is not None:
                clock.add(begin, clock.mark())
    rows = []
    for prep, clock in turns:
        prep["before"] = None     # measured with the other models already on the device
        times = clock.times_ms()
        row = _row(prep, model_name, world, batch, length, precision, steps, warmup, fsdp, times,
                   None, interleaved=True)
        # Each step's pace is its slowest process's time; the ratio of two methods' steps of the
        # same turn cancels whatever drifts between turns (the host's state, the clocks).
        row["step_ms_per_step"] = [max(ts) for ts in zip(*world.gather(times))]
        rows.append(row)
    for row in rows[1:]:
        row["paired_ratio_vs_first"] = paired_ratio(row["step_ms_per_step"],
                                                    rows[0]["step_ms_per_step"])
    return rows


def paired_ratio(times: list[float], reference: list[float], resamples: int = 2000) -> dict:
    """The per-turn ratios times[k] / reference[k]: their median, 10th and 90th percentiles, and
    a 95% bootstrap interval of the median (scipy.stats.bootstrap, percentile method, `resamples`
    resamples of the turns, fixed seed)."""
    import numpy as np
    from scipy.stats import bootstrap
    ratios = [t / r for t, r in zip(times, reference)]
    if len(ratios) < 2:
        return {"turns": len(ratios), "median": ratios[0] if ratios else None}
    ci = bootstrap((ratios,), np.median, method="percentile", n_resamples=resamples,
                   rng=np.random.default_rng(0)).confidence_interval
    deciles = statistics.quantiles(ratios, n=10)
    return {"turns": len(ratios), "median": statistics.median(ratios), "p10": deciles[0],
            "p90": deciles[-1], "median_ci95": [float(ci.low), float(ci.high)]}


def _profile(trainer, steps_batches: list, out: Path, method_name: str, world) -> None:
    """After the timed steps: three more under torch.profiler; each process writes the operators'
    table (by device time and by host time) and the host wall time of each step, to tell a step
    bound by the GPU from one bound by the Python that issues it."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if world.device.type == "cuda" else [])
    walls = []
    with profile(activities=activities) as prof:
        for step in steps_batches:
            t0 = time.perf_counter()
            trainer.train_step(step)
            walls.append(1000 * (time.perf_counter() - t0))   # host time to issue the step
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)
    table = prof.key_averages()
    sort = "self_cuda_time_total" if world.device.type == "cuda" else "self_cpu_time_total"
    out.mkdir(parents=True, exist_ok=True)
    text = (f"{method_name}, process {world.rank}: host ms per step (issuing, profiled) "
            f"{[round(w, 1) for w in walls]}\n\n"
            f"by device time:\n{table.table(sort_by=sort, row_limit=40)}\n\n"
            f"by host time:\n{table.table(sort_by='self_cpu_time_total', row_limit=40)}\n")
    (out / f"profile-{method_name}-rank{world.rank}.txt").write_text(text)


def render(record: dict) -> str:
    lines = ["| model | method | fsdp | processes | batch x length | ms/step | tokens/s | "
             "peak GiB per process | vs the first, paired by turn: median [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        peaks = ", ".join(f"{p / 2 ** 30:.2f}" for p in r["peak_memory_bytes_per_process"]
                          if p is not None) or "-"
        paired = r.get("paired_ratio_vs_first") or {}
        ci = paired.get("median_ci95")
        vs = (f"{paired['median']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else
              f"{paired['median']:.3f}" if paired.get("median") is not None else "-")
        lines.append(f"| {r['model']} | {r['method']} | {r['fsdp']} | {r['processes']} | "
                     f"{r['global_batch']} x {r['length']} | {r['step_ms_median']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {peaks} | {vs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b", help="a model config name (llama-1b, tiny-llama)")
    ap.add_argument("--methods", default="lora,delta-lora", help="comma list of " + ", ".join(METHODS))
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    ap.add_argument("--length", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--no-fsdp", dest="fsdp", action="store_false",
                    help="the plain model (one process only): the unsharded baseline")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    ap.add_argument("--name", default=None, help="record file name (default: a new run id)")
    ap.add_argument("--interleave", action="store_true",
                    help="time the methods' steps in turn, all models alive (ratios free of the "
                         "order they run in; no peak memory)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="also profile three steps per method; operator tables go to this folder")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    problems = [f"unknown method {m!r} (valid: {', '.join(METHODS)})" for m in methods
                if m not in METHODS]
    for key in ("batch", "length", "steps"):
        if getattr(args, key) <= 0:
            problems.append(f"--{key} must be positive")
    if args.warmup < 0:
        problems.append("--warmup must be >= 0")
    if args.interleave and args.profile is not None:
        problems.append("--profile profiles one method at a time: leave out --interleave")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    from deltalora_repro import records
    from deltalora_repro.errors import ConfigError
    from deltalora_repro.world import World
    try:
        world = World.from_env(args.device)
        if args.batch % world.size:
            raise ConfigError(f"--batch {args.batch} does not split over {world.size} processes")
        if not args.fsdp and world.size > 1:
            raise ConfigError("--no-fsdp runs one process (the unsharded baseline)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.interleave:
        rows = bench_interleaved(args.model, methods, world, args.batch, args.length,
                                 args.precision, args.steps, args.warmup, args.fsdp)
    else:
        if len(methods) > 1 and world.is_main:
            print("note: the methods run one after another in the same processes; their time "
                  "ratio depends on that order (--interleave measures it; this mode is for peak "
                  "memory)", file=sys.stderr)
        rows = [bench_one(args.model, m, world, args.batch, args.length, args.precision,
                          args.steps, args.warmup, args.fsdp, args.profile) for m in methods]
    if world.is_main:
        record = {"kind": "bench-fsdp", "schema": records.SCHEMA, "rows": rows,
                  "world": world.describe(), "machine": records.machine(world.device),
                  "git": records.git_state(), "versions": records.versions(),
                  "command": " ".join(["torchrun", f"--nproc_per_node={world.size}",
                                       "scripts/bench_fsdp.py", *sys.argv[1:]]),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        name = args.name or f"fsdp-{records.new_run_id()}"
        path = args.out / f"{name}.json"
        records.write_json_atomic(path, record)
        print(render(record))
        print(f"record: {path}")
        print(json.dumps({"record": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training and evaluation speed of the CIFAR-10 evaluation network, and its peak memory.

The paper's setting: DARTS_V2, C=36, 20 cells, auxiliary head, drop path 0.2 (its value late in
training), batch 96, 32x32 inputs. Each configuration runs in its own process so that peak memory
(max RSS on the CPU, peak allocated memory on a GPU) is its own.

    python benchmarks/train_step.py                                  # ours, format auto and off
    python benchmarks/train_step.py --steps 2 --eval_batches 2      # quicker
    python benchmarks/train_step.py --reference ../darts/cnn         # also time the authors' model
    python benchmarks/train_step.py --device cuda --amp auto --json results.json

``--reference DIR`` imports ``model.py`` and ``genotypes.py`` from a checkout of the authors' code
(its ``cnn`` folder) and times their network with the same loop, in their memory format; their
CUDA-only drop path is replaced by the same in-place operation on the benchmark's device.

Run by hand; figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def _reference_model(path: str, device):
    import torch

    sys.path.insert(0, os.path.abspath(path))
    import genotypes  # the authors' modules
    import model as ref_model

    def drop_path(x, drop_prob):  # their operation, on any device
        if drop_prob > 0.0:
            keep = 1.0 - drop_prob
            mask = torch.empty(x.size(0), 1, 1, 1, device=x.device).bernoulli_(keep)
            x.div_(keep)
            x.mul_(mask)
        return x

    ref_model.drop_path = drop_path
    return ref_model.NetworkCIFAR(36, 10, 20, True, genotypes.DARTS).to(device)


def one(impl: str, batch: int, steps: int, eval_batches: int, device: str, threads: int, channels_last: str,
        amp: str, reference: str | None) -> dict:
    import torch
    import torch.nn.functional as F

    from dartsnas.engine.evaluate_cnn import autocast, resolve_amp, use_channels_last
    from dartsnas.engine.train_cnn import train_step
    from dartsnas.genotype import get_genotype
    from dartsnas.models.cnn import NetworkCIFAR

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if impl == "reference":
        model = _reference_model(reference, dev)  # type: ignore[arg-type]
        amp_dtype, cl = None, False
    else:
        model = NetworkCIFAR(36, 10, 20, True, get_genotype("DARTS_V2"))
        amp_dtype = resolve_amp(amp, dev)
        cl = use_channels_last(channels_last, dev, amp_dtype)
        model = model.to(dev)
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = model.to(memory_format=fmt)
    model.drop_path_prob = 0.2
    optimizer = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    x = torch.randn(batch, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        sync()
        t0 = time.perf_counter()
        if impl == "reference":
            optimizer.zero_grad()
            logits, logits_aux = model(x)
            loss = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(logits_aux, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            loss.item()
        else:
            loss, _ = train_step(model, optimizer, x, y, grad_clip=5.0, auxiliary_weight=0.4, amp_dtype=amp_dtype,
                                 scaler=scaler)
            loss.item()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    model.eval()
    eval_times = []
    with torch.no_grad():
        for i in range(eval_batches + 1):
            sync()
            t0 = time.perf_counter()
            with autocast(dev, amp_dtype):
                model(x)
            sync()
            if i:
                eval_times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    step_s = statistics.median(times)
    return {"impl": impl, "batch": batch, "channels_last": cl, "amp": str(amp_dtype).replace("torch.", ""),
            "train_step_s": step_s, "train_images_per_s": batch / step_s,
            "eval_images_per_s": batch / statistics.median(eval_times), "peak_gib": peak, "steps": steps,
            "device": device, "threads": threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    p.add_argument("--eval_batches", type=int, default=3, help="timed evaluation batches (after one warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--formats", default="auto,off", help="channels-last settings of ours to time: auto,on,off")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--reference", metavar="DIR", help="the cnn/ folder of the authors' code, to time it too")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "impl,channels_last" in a child process
    args = p.parse_args()
    if args.one:
        impl, fmt = args.one.split(",")
        print(json.dumps(one(impl, args.batch, args.steps, args.eval_batches, args.device, args.threads, fmt,
                             args.amp, args.reference)))
        return
    runs = [("ours", f) for f in args.formats.split(",")]
    if args.reference:
        runs.append(("reference", "off"))
    rows = []
    for impl, fmt in runs:
        cmd = [sys.executable, __file__, "--one", f"{impl},{fmt}", "--batch", str(args.batch), "--steps",
               str(args.steps), "--eval_batches", str(args.eval_batches), "--device", args.device, "--threads",
               str(args.threads), "--amp", args.amp]
        if args.reference:
            cmd += ["--reference", args.reference]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"{impl} ({fmt}) failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{impl:9s} channels_last={row['channels_last']!s:5s} amp={row['amp']:8s} "
              f"train {row['train_images_per_s']:7.1f} img/s ({row['train_step_s']:.3f} s/step)  "
              f"eval {row['eval_images_per_s']:7.1f} img/s  peak {row['peak_gib']:.2f} GiB  "
              f"({args.device}, {args.threads} threads, batch {args.batch})", flush=True)
    if args.json:
        import torch

        meta = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                "torch": torch.__version__, "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

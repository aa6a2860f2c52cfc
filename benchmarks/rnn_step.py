"""Time one recurrent search step and the training throughput of the final model.

* ``search``: one full search step (alpha step + weight step) at the paper's search size (batch
  256, bptt 35, 300 units, PTB's 10,000-word vocabulary), first and second order
  (finite-difference HVP unless ``--hvp exact``).
* ``train``: training tokens per second of the 850-unit DARTS_V2 model (batch 64, bptt 35).
  With ``--reference DIR`` (a folder holding the authors' ``rnn/``), their model is timed too, with
  their training step (log-softmax + NLL, TAR, clip, SGD) and the same settings.

Each configuration runs in its own process so that its peak memory (max RSS, or peak CUDA memory on
a GPU) is its own. Inputs are random token ids: the cost does not depend on the text.

    python benchmarks/rnn_step.py                          # search (orders 1, 2) and train
    python benchmarks/rnn_step.py --what search --orders 1 --steps 2
    python benchmarks/rnn_step.py --json results.json

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

VOCAB = 10000


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak(dev) -> float:
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def matmul_rate(dev) -> float:
    """This machine's best float32 matrix-product rate (GFLOP/s) over the search's own shapes: the
    cell's edge projections and the decoder. Divides a step's matrix-product FLOPs into a lower
    bound of its time."""
    import torch

    best = 0.0
    for m, k, n in ((2048, 300, 600), (256, 600, 600), (8960, 300, 10000), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev)
        out = torch.empty(m, n, device=dev)
        for i in range(4):
            _sync(dev)
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            _sync(dev)
            if i:
                best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def search(order: int, steps: int, device: str, hvp: str, threads: int, batch: int, bptt: int,
           compile: bool = False, flops: bool = False) -> dict:
    import torch

    from dartsnas.engine.search_rnn import RNNSearchConfig, TextBatch, build_search, search_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = RNNSearchConfig(unrolled=order == 2, hvp=hvp, batch_size=batch, bptt=bptt, compile=compile)
    model, w_opt, architect = build_search(cfg, VOCAB, dev)
    state = {"hidden": model.init_hidden(batch), "hidden_valid": model.init_hidden(batch)}

    def step(i: int) -> float:
        """One search step on fresh random chunks; its time in seconds."""
        tokens = torch.randint(0, VOCAB, (bptt + 1, batch), device=dev)
        tokens_v = torch.randint(0, VOCAB, (bptt + 1, batch), device=dev)
        _sync(dev)
        t0 = time.perf_counter()
        train = TextBatch(tokens[:-1], tokens[1:], state["hidden"], 2 * i)
        valid = TextBatch(tokens_v[:-1], tokens_v[1:], state["hidden_valid"], 2 * i + 1)
        _, state["hidden"], state["hidden_valid"] = search_step(model, w_opt, architect, train, valid,
                                                                cfg.learning_rate, cfg)
        _sync(dev)
        return time.perf_counter() - t0

    warmup = step(0)  # warms up allocators (and compiles, with --compile)
    times = [step(i) for i in range(1, steps + 1)]
    counter = None
    if flops:  # one more, untimed step, its FLOPs counted
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step(steps + 1)
    row = {"what": "search", "order": order, "batch": batch, "bptt": bptt, "median_s": statistics.median(times),
           "steps": steps, "peak_gib": _peak(dev), "device": device, "hvp": hvp, "threads": threads,
           "compile": compile, "warmup_s": warmup}
    if counter is not None:
        rate = matmul_rate(dev)
        row |= {"gflop": counter.get_total_flops() / 1e9, "matmul_gflops": rate,
                "floor_s": counter.get_total_flops() / 1e9 / rate}
    return row


def train(steps: int, device: str, threads: int, batch: int, bptt: int, nhid: int, pack: bool = True) -> dict:
    import torch

    from dartsnas.engine.train_rnn import weight_step
    from dartsnas.genotype import get_genotype
    from dartsnas.models.rnn import RNNModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = RNNModel(VOCAB, nhid, nhid, nhid, genotype=get_genotype("DARTS", kind="rnn"), packed=pack).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=20.0, weight_decay=8e-7)
    hiddens = [model.init_hidden(batch)]

    def step(tokens):
        weight_step(model, opt, list(model.parameters()), tokens[:-1], tokens[1:], hiddens, 20.0, 0.25, 1e-3)

    row = _time_training("train", step, dev, steps, batch, bptt, nhid, threads)
    # Recorded only when off, so that the default matches earlier revisions in compare.py.
    return row if pack else {**row, "pack_weights": False}


def _time_training(what: str, step, dev, steps: int, batch: int, bptt: int, nhid: int, threads: int) -> dict:
    """Median time of ``step(tokens)`` on random (bptt + 1, batch) token chunks, after one warm-up."""
    import torch

    times = []
    for i in range(steps + 1):
        tokens = torch.randint(0, VOCAB, (bptt + 1, batch), device=dev)
        _sync(dev)
        t0 = time.perf_counter()
        step(tokens)
        _sync(dev)
        if i:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"what": what, "batch": batch, "bptt": bptt, "nhid": nhid, "median_s": median,
            "tokens_per_s": batch * bptt / median, "steps": steps, "peak_gib": _peak(dev), "device": str(dev),
            "threads": threads}


def _reference_shims() -> None:
    """What the authors' PyTorch 0.3 code needs from today's PyTorch on a CPU: ``.cuda()`` as the
    identity, and the removed ``nn.Embedding._backend`` routed to ``F.embedding`` (their
    ``embedded_dropout`` passes ``padding_idx=-1`` for "none")."""
    import types

    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self

    def embedding(words, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse):
        padding_idx = None if padding_idx is not None and padding_idx < 0 else padding_idx
        return F.embedding(words, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)

    nn.Embedding._backend = types.SimpleNamespace(Embedding=types.SimpleNamespace(apply=embedding))


def train_reference(ref: str, steps: int, device: str, threads: int, batch: int, bptt: int, nhid: int) -> dict:
    """The authors' ``rnn/model.py`` (DARTS genotype) trained with their ``train.py`` step: NLL of
    their log-softmax output plus TAR (beta 1e-3), clip 0.25, SGD lr 20, the paper's dropouts."""
    import torch
    import torch.nn.functional as F

    _reference_shims()
    sys.path.insert(0, os.path.join(ref, "rnn"))
    import genotypes as ref_genotypes
    import model as ref_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = ref_model.RNNModel(VOCAB, nhid, nhid, nhid, 0.75, 0.25, 0.75, 0.2, 0.1,
                               cell_cls=ref_model.DARTSCell, genotype=ref_genotypes.DARTS).to(dev)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=20.0, weight_decay=8e-7)
    hidden = [model.init_hidden(batch)]

    def step(tokens):
        h = [x.detach() for x in hidden[0]]
        opt.zero_grad()
        log_prob, hidden[0], rnn_hs, _ = model(tokens[:-1], h, return_h=True)
        loss = F.nll_loss(log_prob.view(-1, log_prob.size(2)), tokens[1:].reshape(-1))
        loss = loss + sum(1e-3 * (x[1:] - x[:-1]).pow(2).mean() for x in rnn_hs[-1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()

    return _time_training("train-reference", step, dev, steps, batch, bptt, nhid, threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="search,train", help="comma-separated: search, train")
    p.add_argument("--orders", default="1,2")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 256 search, 64 train)")
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--nhid", type=int, default=850, help="units of the trained model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hvp", default="fd", choices=["fd", "exact"])
    p.add_argument("--compile", action="store_true", help="search with --compile (torch.compile'd node kernels)")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="train with --no-pack_weights (one PyTorch product per time step)")
    p.add_argument("--flops", action="store_true",
                   help="also count one search step's FLOPs and divide them by this machine's best matrix-product "
                        "rate: a lower bound of the step's time")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--reference", metavar="DIR", help="folder of the authors' code (holding rnn/): also time their "
                                                      "850-unit model's training step")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "search,ORDER" or "train" in a child process
    args = p.parse_args()
    if args.one:
        if args.one == "train":
            row = train(args.steps, args.device, args.threads, args.batch or 64, args.bptt, args.nhid, args.pack)
        elif args.one == "train-reference":
            row = train_reference(args.reference, args.steps, args.device, args.threads, args.batch or 64, args.bptt,
                                  args.nhid)
        else:
            row = search(int(args.one.split(",")[1]), args.steps, args.device, args.hvp, args.threads,
                         args.batch or 256, args.bptt, args.compile, args.flops)
        print(json.dumps(row))
        return
    jobs = []
    whats = args.what.split(",")
    if "search" in whats:
        jobs += [f"search,{order}" for order in args.orders.split(",")]
    if "train" in whats:
        jobs.append("train")
        if args.reference:
            jobs.append("train-reference")
    rows = []
    for job in jobs:
        cmd = [sys.executable, __file__, "--one", job, "--steps", str(args.steps), "--bptt", str(args.bptt),
               "--nhid", str(args.nhid), "--device", args.device, "--hvp", args.hvp, "--threads", str(args.threads)]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        cmd += ["--compile"] * args.compile + ["--flops"] * args.flops + ["--no-pack"] * (not args.pack)
        if args.reference:
            cmd += ["--reference", args.reference]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        if row["what"] == "search":
            print(f"search order {row['order']}  batch {row['batch']}  median {row['median_s']:8.3f} s/step  "
                  f"peak {row['peak_gib']:6.2f} GiB  ({args.device}, {args.threads} threads, hvp={args.hvp}"
                  f"{', compiled' if row['compile'] else ''}; first step {row['warmup_s']:.1f} s)", flush=True)
            if "gflop" in row:
                print(f"  {row['gflop']:.0f} GFLOP of matrix products per step: at least {row['floor_s']:.2f} s at "
                      f"this machine's best {row['matmul_gflops']:.0f} GFLOP/s", flush=True)
        else:
            label = row["what"] + (" (--no-pack_weights)" if row.get("pack_weights") is False else "")
            print(f"{label} {row['nhid']} units  batch {row['batch']}  {row['tokens_per_s']:9.0f} tokens/s  "
                  f"({row['median_s']:.3f} s/step)  peak {row['peak_gib']:6.2f} GiB  ({args.device}, "
                  f"{args.threads} threads)", flush=True)
    if args.json:
        import torch

        meta = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                "torch": torch.__version__, "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

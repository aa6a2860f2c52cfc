"""What each ``dartsnas`` command does once its flags are parsed: one small function per command.

Each builds its settings, calls the engine's ``run`` (the Python API) and prints the result. Engines
are imported inside the functions, so a command loads only its own engine (and torch only when it
needs it); the table in :mod:`dartsnas.cli` names these functions by import path.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .config import explicit_args, make_config
from .errors import UserError
from .genotype import NAMED, load_genotype


def _settings(args: argparse.Namespace, cls: type, resume: Callable[[str, dict[str, Any]], Any],
              fresh: Callable[[], Any]) -> Any:
    """The settings of a run: a new run's from defaults, YAML and flags, or a resumed run's stored
    ones with the flags that may change."""
    if not args.resume:
        return fresh()
    if args.config:
        raise UserError("--config cannot be combined with --resume (the run keeps its stored settings)")
    return resume(args.resume, explicit_args(cls, args))


def _gpu(args: argparse.Namespace) -> None:
    # --gpu N is the authors' spelling of --device cuda:N.
    if args.gpu is not None:
        args.device = f"cuda:{args.gpu}"


def search_cnn(args: argparse.Namespace) -> int:
    from .engine import search_cnn as engine

    cfg = _settings(args, engine.SearchConfig, engine.resume_config,
                    lambda: make_config(engine.SearchConfig, args, args.config))
    result = engine.run(cfg, resume=args.resume)
    print(f"genotype = {result.genotype}")
    if result.selected is not None:
        print(f"genotype (DARTS-PT) = {result.selected}")
    print(f"run directory: {result.run_dir}")
    return 0


def select(args: argparse.Namespace) -> int:
    from .engine import select_pt as engine

    cfg = engine.settings(args.run_dir, explicit_args(engine.SelectConfig, args))
    result = engine.run(args.run_dir, cfg)
    print(f"genotype (DARTS-PT) = {result.genotype}")
    print(f"written to {result.run_dir / engine.GENOTYPE_FILE}")
    return 0


def search_rnn(args: argparse.Namespace) -> int:
    from .engine import search_rnn as engine

    cfg = _settings(args, engine.RNNSearchConfig, engine.resume_config,
                    lambda: make_config(engine.RNNSearchConfig, args, args.config))
    result = engine.run(cfg, resume=args.resume)
    print(f"genotype = {result.genotype}")
    print(f"run directory: {result.run_dir}")
    return 0


def train_cnn(args: argparse.Namespace) -> int:
    from .engine import train_cnn as engine

    _gpu(args)
    cls = engine.CONFIGS[args.target]
    cfg = _settings(args, cls, engine.resume_config, lambda: make_config(cls, args, args.config))
    if args.resume and cfg.network != args.target:
        raise UserError(f"{args.resume} is a {cfg.network} run; resume it with dartsnas train {cfg.network}")
    result = engine.run(cfg, resume=args.resume)
    if result.test is not None:
        print(f"test error: {100 - result.test.top1:.2f}% (accuracy {result.test.top1:.2f}%) on "
              f"{result.test.images} images")
    print(f"run directory: {result.run_dir}")
    return 0


def train_rnn(args: argparse.Namespace) -> int:
    from .engine import train_rnn as engine

    cfg = _settings(args, engine.TrainConfig, engine.resume_config,
                    lambda: engine.config_from_args(args, args.target))
    result = engine.run(cfg, resume=args.resume)
    print(f"best valid ppl {engine.perplexity(result.best_valid_loss):.2f}")
    if result.test_loss is not None:
        print(f"test ppl {engine.perplexity(result.test_loss):.2f}")
    print(f"run directory: {result.run_dir}")
    return 0


def test_cnn(args: argparse.Namespace) -> int:
    from .engine import evaluate_cnn as engine

    _gpu(args)
    result = engine.run_test(make_config(engine.TestConfig, args), args.target)
    print(f"network: {result.description}")
    print(f"test images: {result.images} ({result.source})")
    if args.target == "imagenet":
        print(f"test error: top-1 {result.error:.2f}%  top-5 {result.error_top5:.2f}%  "
              f"(accuracy {result.top1:.2f}% / {result.top5:.2f}%)")
    else:
        print(f"test error: {result.error:.2f}%  (accuracy {result.top1:.2f}%)")
    print(f"test loss: {result.loss:.4f}")
    print(f"parameters: {result.parameters:,} ({result.parameters / 1e6:.2f}M, without the auxiliary head)")
    print(f"speed: {result.images_per_s:.1f} images/s")
    return 0


def test_rnn(args: argparse.Namespace) -> int:
    from .engine import evaluate_rnn as engine
    from .settings.train_rnn import DEFAULT_DATA

    result = engine.run_test(make_config(engine.TestConfig, args), DEFAULT_DATA[args.target])
    print(f"parameters {result.parameters:,}")
    print(f"valid loss {result.valid_loss:.4f} | valid ppl {result.valid_ppl:.2f}")
    print(f"test loss {result.test_loss:.4f} | test ppl {result.test_ppl:.2f}")
    return 0


def info(args: argparse.Namespace) -> int:
    from .settings.choices import NETWORK_DEFAULTS, RNN_NETWORKS
    from .settings.evaluate_cnn import InfoConfig

    cfg = make_config(InfoConfig, args)
    if cfg.dataset in RNN_NETWORKS:
        from .engine.evaluate_rnn import rnn_info

        units, vocab = RNN_NETWORKS[cfg.dataset]
        units, vocab = cfg.units or units, cfg.vocab or vocab
        n = rnn_info(args.arch, ntoken=vocab, emsize=units)
        print(f"network: recurrent language model, {units} units, vocabulary {vocab:,}")
        print(f"parameters: {n:,} ({n / 1e6:.2f}M), tied embedding and decoder counted once")
        return 0
    from .engine.evaluate_cnn import NETWORK_NAMES, network_info

    result = network_info(args.arch, cfg)
    defaults = NETWORK_DEFAULTS[cfg.dataset]
    print(f"network: {NETWORK_NAMES[cfg.dataset]}, {cfg.layers or defaults['layers']} cells, "
          f"C={cfg.init_channels or defaults['init_channels']}")
    print(f"parameters: {result.parameters:,} ({result.parameters / 1e6:.2f}M) without the auxiliary head, "
          f"{result.parameters_with_auxiliary:,} with it")
    print(f"multiply-adds: {result.multiply_adds / 1e6:.1f}M per {result.image_size}x{result.image_size} image "
          f"(convolutions and linear layers)")
    return 0


def export(args: argparse.Namespace) -> int:
    from .engine.export import export_network
    from .settings.export import ExportConfig

    result = export_network(make_config(ExportConfig, args), args.source)
    print(f"network: {result.description}")
    print(f"graph: {result.signature}")
    if result.max_difference is None:
        print(f"check: {result.check_note}")
    else:
        print(f"check: largest output difference {result.max_difference:.2e} ({result.check_note})")
    print(f"wrote {result.path} ({result.format})")
    return 0


def data_download(args: argparse.Namespace) -> int:
    from .data.download import DATASETS, download
    from .settings.data import DownloadConfig

    cfg = make_config(DownloadConfig, args)
    result = download(args.dataset, cfg.dir, force=cfg.force, timeout=cfg.timeout)
    title = DATASETS[args.dataset].title
    if not result.fetched:
        print(f"{title} is already in {result.folder} (checksums verified)")
    else:
        print(f"downloaded {title} into {result.folder}: {len(result.files)} files, checksums verified")
    hint = f"dartsnas train {args.dataset}"
    if cfg.dir:
        hint += f" --data {result.folder}"
    print(f"use it with: {hint}")
    return 0


def genotypes(args: argparse.Namespace) -> int:
    if args.action == "random":
        from .genotype import random_genotype

        if args.spec:
            raise UserError("dartsnas genotypes random takes no NAME; use --seed N and --kind cnn|rnn")
        genotype = random_genotype(args.seed, args.kind)
        print(genotype.to_json() if args.json else str(genotype))
        return 0
    if args.action == "show":
        if not args.spec:
            raise UserError("dartsnas genotypes show needs a NAME, genotype file, run directory or genotype string")
        genotype = load_genotype(args.spec)
        print(genotype.to_json() if args.json else str(genotype))
        return 0
    aliases: dict[int, list[str]] = {}
    for name, g in NAMED.items():
        aliases.setdefault(id(g), []).append(name)
    for names in aliases.values():
        g = NAMED[names[0]]
        label = " = ".join(names)
        print(f"{label:28s} {g.kind}  {g.steps} nodes")
    return 0


def protocol(args: argparse.Namespace) -> int:
    from .engine import protocol as engine

    given = engine.cli_settings(args)
    if args.resume:
        stage_given = sorted(k for k in given if "." in k or k not in engine.RUNTIME_OPTIONS)
        if args.config or stage_given:
            raise UserError("--resume keeps the protocol's stored settings; only --jobs, --device and --threads "
                            "may be given with it")
        settings = engine.load_protocol(args.resume, given, args.target)
    else:
        settings = engine.make_protocol(args.target, given, args.config)
    result = engine.run(settings)
    final = result.summary["final"]["test"]
    sel = result.summary["selection"]
    print(f"selected: the cell of search seed {sel['seed']} ({sel['metric']} {sel['score']:.4f})")
    if final["mean"] is not None:
        spread = f" +- {final['std']:.2f}" if final["std"] is not None else ""
        print(f"test {result.summary['test_metric']}: {final['mean']:.2f}{spread} over {final['n']} runs")
    print(f"summary: {result.run_dir / 'summary.md'}")
    return 0

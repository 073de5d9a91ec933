"""tools/ablate.py: train variants over a learning-rate grid and compare them at their best rates.

    python tools/ablate.py [--variants base diff ngpt diff+ngpt flaming all my.yaml] [--config C.yaml]
                           [--work-dir runs/ablate] [--lrs 1e-3 3e-3 1e-2] [--seeds 1 2] [--slurm]
                           [pretrain_neon.py flags for every run, e.g. --train-iters 300]

Every run is the real pretrain_neon.py under torchrun. Rerunning the command resumes: finished
runs are skipped, an interrupted run resumes from its checkpoint. See docs/ablations.md.
Exit status: 0 the table was written, 1 every base run failed, 2 bad input (nothing was run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from neon.ablation import datastore, grid, report, runs, slurm
from neon.ablation.runs import REPO, RunPoint
from neon.ablation.variants import (
    DEFAULT_VARIANTS,
    AblationError,
    Variant,
    ablation_features,
    features_off,
    parse_variants,
    variant_config,
)
from neon.errors import BAD_INPUT, NeonError

DEMO_CONFIG = REPO / "examples" / "configs" / "cpu_demo.yaml"
DEMO_VOCAB_SIZE = 2048  # as examples/cpu_demo.py
SBATCH = REPO / "examples" / "slurm" / "pretrain_dense.sbatch"
OWNED_FLAGS = ("--config", "--lr", "--min-lr", "--seed", "--run-dir", "--save", "--load")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ablate.py", description=__doc__.split("\n\n")[0],
                                epilog="Other flags go to every pretrain_neon.py run (see its --help).")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="VARIANT",
                   help=f"built-in names (base, {', '.join(ablation_features())}, all, '+'-joined combinations) "
                        "or YAML "
                        f"overlay files (default: {' '.join(DEFAULT_VARIANTS)}); base is always added")
    p.add_argument("--config", type=Path, default=DEMO_CONFIG,
                   help="base config; every feature is switched off for the base (default: the CPU demo's, on "
                        "the demo corpus)")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "ablate")
    p.add_argument("--lrs", nargs="+", type=float, help="starting grid (default: the config's lr / 3, lr, lr x 3)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="seeds of every rate (default: 1 2)")
    p.add_argument("--max-rates", type=int, default=7, help="rates per variant at most, extensions included")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per run (local runs)")
    p.add_argument("--run-timeout", type=float, default=24 * 3600.0, help="seconds one local run may take")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again (default: report them)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's checkpoints")
    p.add_argument("--slurm", action="store_true", help="run each round as a job array of --sbatch")
    p.add_argument("--sbatch", type=Path, default=SBATCH, help="the sbatch script of --slurm")
    p.add_argument("--sbatch-args", default="--nodes=1", help="sbatch options of --slurm (default: --nodes=1)")
    p.add_argument("--plan", action="store_true", help="check everything, list the runs of the next round, run none")
    return p


def fail(message: str, status: int = BAD_INPUT) -> int:
    print(f"ablate.py: error: {message}", file=sys.stderr)
    return status


@dataclass
class Setup:
    variants: list[Variant]
    configs: dict[str, Path]  # variant -> its YAML
    common: list[str]  # pretrain_neon.py flags of every run (data, extra)
    rates: list[float]
    min_lr_ratio: float
    train_iters: int
    seq_length: int
    budget_tokens: int
    points: dict = field(default_factory=dict)  # (variant, lr, seed) -> RunPoint

    def point(self, work: Path, variant: str, lr: float, seed: int) -> RunPoint:
        key = (variant, lr, seed)
        if key not in self.points:
            self.points[key] = runs.make_point(work, variant, self.configs[variant], lr, seed, self.min_lr_ratio,
                                               self.common)
        return self.points[key]


def _check(variants: list[Variant], configs: dict[str, Path], flags: list[str], world_size: int,
           open_sources: bool = True):
    """Each variant's config through pretrain_neon.py's own resolution (and, with open_sources, what
    its features will open); the base's resolved Config."""
    from neon.features import active
    from neon.training.config import resolve

    resolved = {}
    for v in variants:
        where = f"variant {v.name!r}" + ("" if v.source == "built-in" else f" ({v.source})")
        run = str(configs[v.name].parent.parent / "runs" / v.name)  # as every run has (runs.make_point)
        try:
            resolved[v.name] = resolve(["--config", str(configs[v.name]), *flags, "--run-dir", run, "--save", run,
                                        "--load", run], world_size=world_size, check_files=False)
            model = resolved[v.name].neon_config()
            for feature in active(model) if open_sources else ():  # e.g. an IO function's source, before any run
                feature.prepare(model)
        except NeonError as e:
            raise AblationError(f"{where}: {e}") from None
        except SystemExit:  # argparse already printed which flag it did not know
            raise AblationError(f"pretrain_neon.py does not accept the run flags {flags} (above). Fix: give only "
                                f"pretrain_neon.py flags after the tool's own (see pretrain_neon.py --help).") from None
    return resolved["base"]


def _check_validation(cfg) -> None:
    """A run counts as finished by its final validation record: the config must evaluate."""
    split = [float(w) for w in str(cfg.data.split).replace("/", ",").split(",")]
    if cfg.schedule.eval_iters <= 0:
        raise AblationError(f"--eval-iters={cfg.schedule.eval_iters}: the ablation compares final validation "
                            f"losses, so every run must evaluate. Fix: set schedule.eval_iters to 1 or more.")
    if len(split) < 2 or split[1] <= 0:
        raise AblationError(f"--split={cfg.data.split!r} leaves no validation data, and the ablation compares final "
                            f"validation losses. Fix: give the validation split a share, e.g. 98,2,0.")


def setup(args, extra: list[str]) -> Setup:
    """Everything checked and the data ready, before any run."""
    from neon.training.config import ConfigError, load_yaml

    owned = [f for f in extra if f.split("=")[0] in OWNED_FLAGS]
    if owned:
        raise AblationError(f"{owned[0]} is set by the ablation per run. Fix: give the base with --config and the "
                            f"grid with --lrs / --seeds.")
    feature_flags = {f"--{p}{k.replace('_', '-')}" for k in features_off() for p in ("", "no-")}
    switches = [f for f in extra if f.split("=")[0] in feature_flags]
    if switches:
        raise AblationError(f"{switches[0]} would switch a feature for every variant, the base included. Fix: name "
                            f"the variants with --variants (e.g. base ngpt) or give an overlay file.")
    try:
        base_yaml = load_yaml(args.config)
    except ConfigError as e:
        raise AblationError(str(e)) from None
    work = args.work_dir.resolve()
    store = work / "datastore"
    variants = parse_variants(args.variants, base_yaml, {datastore.VARIABLE: str(store)})
    build_store = datastore.VARIABLE not in os.environ and any(datastore.VARIABLE in v.variables for v in variants)
    (work / "variants").mkdir(parents=True, exist_ok=True)
    configs = {}
    for v in variants:
        configs[v.name] = work / "variants" / f"{v.name}.yaml"
        configs[v.name].write_text(f"# {v.name}: {args.config} with every feature off + {v.source} overlay\n"
                                   + yaml.safe_dump(variant_config(base_yaml, v), sort_keys=False))
    demo_data = not (base_yaml.get("data") or {}).get("data_path") and "--data-path" not in extra
    data_flags = []
    if demo_data:  # checked first with the paths the demo data will have, then built
        from neon.data.corpus import demo_data_paths, prepare_demo_data

        tokenizer, prefix = demo_data_paths(work / "data", DEMO_VOCAB_SIZE)
        future = ["--data-path", prefix, "--tokenizer-model", str(tokenizer), "--vocab-size", str(DEMO_VOCAB_SIZE)]
        _check_validation(_check(variants, configs, [*extra, *future], args.nproc_per_node, not build_store))
        tokenizer, prefix = prepare_demo_data(work / "data", DEMO_VOCAB_SIZE)
        data_flags = ["--data-path", str(prefix), "--tokenizer-model", str(tokenizer)]
    common = [*extra, *data_flags]
    cfg = _check(variants, configs, common, args.nproc_per_node, not build_store)
    _check_validation(cfg)
    if build_store:  # from the training split only; then what every variant opens
        datastore.build(cfg.data, store)
        _check(variants, configs, common, args.nproc_per_node)
    lr = cfg.optimizer.lr
    rates = sorted({grid.rate(r) for r in args.lrs}) if args.lrs else grid.starting_rates(lr)
    s = cfg.schedule
    return Setup(variants, configs, common, rates, cfg.optimizer.min_lr / lr if lr else 0.0, s.train_iters,
                 cfg.data.seq_length, s.train_iters * s.global_batch_size * cfg.data.seq_length)


def variant_state(st: Setup, work: Path, name: str, seeds: list[int], max_rates: int):
    """Replays the grid rule over what is on disk: (results, grid state, points still to run)."""
    results: dict[float, dict[int, float | None]] = {}
    while True:
        gs = grid.next_runs(results, st.rates, seeds, max_rates)
        todo = []
        for lr, seed in gs.pending:
            p = st.point(work, name, lr, seed)
            state = runs.state(p, st.train_iters)
            if state == "pending":
                todo.append(p)
            else:
                results.setdefault(lr, {})[seed] = runs.final_loss(p.run_dir, st.train_iters)
        if todo or not gs.pending:
            return results, gs, todo


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Progress:
    """Which run of how many, and the ETA from the mean time of this invocation's runs."""

    def __init__(self):
        self.done, self.seconds, self.start = 0, 0.0, time.monotonic()

    def begin(self, point: RunPoint, index: int, total: int, round_no: int) -> float:
        eta = f", ETA {_fmt(self.seconds / self.done * (total - index + 1))}" if self.done else ""
        print(f"[ablate] round {round_no}, run {index} of {total}{eta}: {point.label} -> {point.run_dir}", flush=True)
        return time.monotonic()

    def end(self, point: RunPoint, t0: float, ok: bool, train_iters: int) -> None:
        took = time.monotonic() - t0
        self.done, self.seconds = self.done + 1, self.seconds + took
        if ok:
            print(f"[ablate]   finished in {took:.0f} s: final validation loss "
                  f"{runs.final_loss(point.run_dir, train_iters):.4f}", flush=True)
        else:
            f = runs.failure(point)
            print(f"[ablate]   FAILED after {took:.0f} s: {f.get('reason')} (log: {f.get('log')})", flush=True)


def run_rounds(args, st: Setup, work: Path) -> None:
    """Round after round: what the grid rule wants next for every variant, until nothing."""
    progress, round_no = Progress(), 0
    while True:
        todo = [p for v in st.variants for p in variant_state(st, work, v.name, args.seeds, args.max_rates)[2]]
        if not todo:
            return
        round_no += 1
        if args.plan:
            print(f"[ablate] next round: {len(todo)} runs (more follow where a best rate sits at the grid's edge)")
            for p in todo:
                print(f"  {p.label}: pretrain_neon.py {' '.join(p.flags)}")
            return
        for p in todo:
            runs.prepare(p)
        if args.slurm:
            t0 = time.monotonic()
            done = slurm.submit(todo, work / "slurm" / f"round{round_no}", args.sbatch, args.sbatch_args,
                                st.train_iters, args.keep_checkpoints)
            print(f"[ablate] round {round_no}: {done} of {len(todo)} runs finished in {_fmt(time.monotonic() - t0)}")
            continue
        for i, p in enumerate(todo, 1):
            t0 = progress.begin(p, i, len(todo), round_no)
            ok = runs.run_local(p, st.train_iters, args.nproc_per_node, args.run_timeout, args.keep_checkpoints)
            progress.end(p, t0, ok, st.train_iters)


def results(args, st: Setup, work: Path) -> list[report.VariantResult]:
    out = []
    for v in st.variants:
        res, gs, _ = variant_state(st, work, v.name, args.seeds, args.max_rates)
        failed = [{"lr": lr, "seed": s, **runs.failure(st.point(work, v.name, lr, s))}
                  for lr, by_seed in sorted(res.items()) for s, loss in sorted(by_seed.items()) if loss is None]
        best_dirs = [st.point(work, v.name, gs.best_lr, s).run_dir for s in args.seeds] if gs.best_lr else []
        finished = [st.point(work, v.name, lr, s).run_dir for lr, by_seed in res.items()
                    for s, loss in by_seed.items() if loss is not None]
        out.append(report.VariantResult(
            name=v.name, source=v.source, grid=dict(sorted(res.items())), best_lr=gs.best_lr,
            best_loss=grid.scores(res, args.seeds)[gs.best_lr] if gs.best_lr else None,
            seed_losses=[res[gs.best_lr][s] for s in args.seeds] if gs.best_lr else [],
            curve=report.mean_curve(best_dirs, st.seq_length), step_time_s=report.median_step_time(finished),
            failed=failed, best_at_edge=gs.at_edge))
    report.compare_to_base(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    work = args.work_dir.resolve()
    try:
        st = setup(args, extra)
        if args.retry_failed:
            for marker in (work / "runs").glob(f"*/*/{runs.FAILED}"):
                marker.unlink()
        for v in st.variants:  # a run directory made with other flags is refused here, before any run
            variant_state(st, work, v.name, args.seeds, args.max_rates)
    except NeonError as e:
        return fail(str(e), e.exit_status)
    print(f"[ablate] {len(st.variants)} variants ({', '.join(v.name for v in st.variants)}), rates from "
          f"{', '.join(f'{r:g}' for r in st.rates)}, seeds {args.seeds}, {st.train_iters} steps "
          f"({st.budget_tokens} tokens) each; work dir {work}", flush=True)
    try:
        run_rounds(args, st, work)
    except KeyboardInterrupt:
        print("\n[ablate] interrupted: rerun the same command to resume (finished runs are kept, the interrupted "
              "one resumes from its last checkpoint)", file=sys.stderr)
        return 130
    if args.plan:
        return 0
    out = results(args, st, work)
    table = report.markdown(out, st.budget_tokens)
    (work / "ablation.md").write_text(table)
    report.write_json(out, work / "ablation.json", st.budget_tokens)
    png = report.plot(out, work / "ablation.png", f"Neon ablation: {args.config.name}, {st.budget_tokens} tokens")
    print("\n" + table)
    print(f"[ablate] table: {work / 'ablation.md'} and {work / 'ablation.json'}; plot: {png}")
    if next(r for r in out if r.name == "base").best_lr is None:
        print("ablate.py: every run of the base failed: nothing to compare against (see the failed runs above)",
              file=sys.stderr)
        return 1
    return 0

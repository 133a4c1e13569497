"""Real-network benchmark: baselines and every optimizer on builtin:unet-digits and a tiny latent pipeline.

For each model, solver and NFE: the error against the converged teacher (``stepopt eval``'s
ode-error: RMSE against the eval default teacher, Heun 100 steps on an EDM rho-7 grid, cached per
seed) and, where the model's samples are 8x8 digits and torch-fidelity is installed, fid-digits
(the digits classifier against the real digits), both computed by :func:`stepopt.evaluate.evaluate`
exactly as ``stepopt eval`` computes them, on the held-out seeds 0..N-1. No optimizer sees those
seeds: trust-region ``--select`` scores on seeds 10000+, ld3 trains on 2000000+, ays stops on
1000000+ (and reports on 2000000+), gits / oss follow trajectories from 3000000+.

Each optimizer runs with its defaults (``trust-region-select`` is trust-region with ``--select``);
its wall time and the network evaluations it spent are recorded: ``evals`` counts the rows that
went through the model's denoiser during the optimize call (the teacher outputs already in the
cache cost none, so the first cell to need a teacher pays for it), ``report_evals`` is the
optimizer's own ``network_evals`` where its report has one (n/a otherwise).

The tiny latent pipeline (``--models tiny-latent``) is a Stable Diffusion-style folder with random
tiny weights (UNet2DConditionModel, AutoencoderKL, a 2-layer CLIP; built as ``tests/_tiny_latent.py``
builds it, saved to a temporary folder, two prompts, guidance 3): ode-error on the latents only,
few seeds. It shows that the path works; its numbers mean little (an untrained network).

    OMP_NUM_THREADS=1 PYTHONPATH=cli python scripts/bench_networks.py [--models builtin:unet-digits,tiny-latent]
        [--solvers dpmpp-3m,unipc] [--nfe 5,8] [--optimizers trust-region,trust-region-select,ld3,ays,gits,oss]
        [--heldout 512] [--metrics ode-error,fid-digits] [--out out/bench_networks.json] [--resume] [--quick]

One JSON line per evaluated schedule while running (the out file is rewritten after each, and
``--resume`` skips the entries it already holds), then the markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepopt import api
from stepopt.build import baseline_schedule
from stepopt.errors import StepoptError
from stepopt.evaluate import EvalConfig, evaluate
from stepopt.io import atomic_write_text
from stepopt.jsontext import json_text
from stepopt.models import load_model
from stepopt.models.base import DiffusionModel
from stepopt.schedule import Schedule
from stepopt.solvers import get_solver
from stepopt.stats import paired_bootstrap
from stepopt.teacher import GridValidator

BASELINES = ("edm", "logsnr", "time-quadratic", "kl-optimal", "time-uniform")
# column name -> (optimizer, config overrides)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "trust-region": ("trust-region", {}),
    "trust-region-select": ("trust-region", {"select": True}),
    "ld3": ("ld3", {}),
    "ays": ("ays", {}),
    "gits": ("gits", {}),
    "oss": ("oss", {}),
}
TINY_LATENT = "tiny-latent"
LATENT_PROMPTS = ("a photo of a cat", "the red dog")
LATENT_GUIDANCE = 3.0


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def tiny_latent_model(folder: Path) -> DiffusionModel:
    """The tiny Stable Diffusion-style pipeline of ``tests/_tiny_latent.py``, saved under ``folder`` and loaded
    as ``diffusers:FOLDER`` with two prompts and guidance 3 (random weights, fixed torch seeds)."""
    path = Path(__file__).resolve().parent.parent / "tests" / "_tiny_latent.py"
    spec = importlib.util.spec_from_file_location("_tiny_latent", path)
    if spec is None or spec.loader is None:
        raise StepoptError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sd = module.make_tiny_sd(folder / "tiny-sd")
    from stepopt.models.diffusers.latent import configure_conditioning

    conditioning = configure_conditioning(
        load_model(f"diffusers:{sd}"), list(LATENT_PROMPTS), None, "", LATENT_GUIDANCE
    )
    if conditioning is None:
        raise StepoptError("the tiny latent pipeline took no conditioning")
    return conditioning.model


@contextmanager
def counting(model: DiffusionModel) -> Iterator[list[int]]:
    """Count the rows through ``model.denoise`` (one evaluation per row; guidance counts once) while active."""
    count = [0]

    def wrap(m: DiffusionModel) -> None:
        inner: Callable[..., torch.Tensor] = m.denoise

        def denoise(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
            count[0] += int(x.shape[0])
            return inner(x, sigma, **cond)

        m.denoise = denoise  # type: ignore[method-assign]

    twin_of: Callable[[], DiffusionModel] = model.differentiable_time

    def differentiable_time() -> DiffusionModel:  # ld3 trains a DDPM network through a twin: count it too
        twin = twin_of()
        if twin is not model:  # a copy.copy of the model: drop the copied wrappers, count the twin's own calls
            twin.__dict__.pop("denoise", None)
            twin.__dict__.pop("differentiable_time", None)
            wrap(twin)
        return twin

    wrap(model)
    model.differentiable_time = differentiable_time  # type: ignore[method-assign]
    try:
        yield count
    finally:
        del model.denoise, model.differentiable_time  # back to the class's methods


def report_evals(report: dict[str, Any]) -> Any:
    """The optimizer's own ``network_evals`` (an int, or a dict of parts with their ``total``), else None."""
    ev = report.get("network_evals")
    if isinstance(ev, dict):
        parts = {k: v for k, v in ev.items() if isinstance(v, int | float)}
        return {**parts, "total": int(sum(parts.values()))}
    return ev


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Small scalar facts of an optimizer's report (what it chose, where it started), for the JSON."""
    keep = (
        "init",
        "starts",
        "start_candidates",
        "chosen",
        "kept_start",
        "keep_best",
        "iterations",
        "best_iteration",
        "stop_reason",
        "validation_rmse",
        "plan",
        "stop_initial",
        "stop_final",
        "selection_initial",
        "selection_final",
        "time_gradient",
    )
    out: dict[str, Any] = {}
    sel = report.get("select")
    if isinstance(sel, dict) and "candidates" in sel:  # trust-region --select: its choice and the candidates' scores
        scores = {c["candidate"]: c["rmse"] for c in sel["candidates"]}
        out["select"] = {"chosen": sel.get("chosen"), "seeds": sel.get("teacher_seeds"), "rmse": scores}
    for k in keep:
        if k in report and k not in out:
            v = report[k]
            out[k] = v if isinstance(v, str | int | float | bool | type(None)) else json_safe(v)
    return out


def json_safe(v: Any, depth: int = 0) -> Any:
    if isinstance(v, dict):
        return {str(k): json_safe(x, depth + 1) for k, x in list(v.items())[:40]} if depth < 3 else "..."
    if isinstance(v, list | tuple):
        return [json_safe(x, depth + 1) for x in v[:20]] if depth < 3 else "..."
    if isinstance(v, str | int | float | bool | type(None)):
        return v
    return str(v)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict[str, Any]] = []
        if args.resume and args.out.exists():
            self.rows = json.loads(args.out.read_text())["rows"]
        for path in args.merge:  # rows of other runs (e.g. cells run in parallel); later files win
            keys = {
                (r["model"], r["solver"], r["nfe"], r["method"]) for r in json.loads(Path(path).read_text())["rows"]
            }
            self.rows = [r for r in self.rows if (r["model"], r["solver"], r["nfe"], r["method"]) not in keys]
            self.rows += json.loads(Path(path).read_text())["rows"]
        if args.merge:
            order = {(m, s): i for i, (m, s) in enumerate(dict.fromkeys((r["model"], r["solver"]) for r in self.rows))}
            self.rows.sort(key=lambda r: (order[(r["model"], r["solver"])], r["nfe"]))
        self.done = {(r["model"], r["solver"], r["nfe"], r["method"]) for r in self.rows}
        self.validators: dict[tuple[str, str, int], GridValidator] = {}

    def save(self) -> None:
        a = self.args
        meta = {
            "heldout": a.heldout,
            "latent_heldout": a.latent_heldout,
            "metrics": a.metrics,
            "teacher": "heun 100 edm",
        }
        atomic_write_text(a.out, json_text({**meta, "rows": self.rows}, 1))

    def score(self, model: DiffusionModel, label: str, sched: Schedule, n: int, metrics: list[str]) -> dict[str, Any]:
        t0 = time.perf_counter()
        (row,) = evaluate([(label, sched)], metrics, model, EvalConfig(n=n, seed=0))
        ode = row.metrics["ode-error"]
        out: dict[str, Any] = {"rmse": float(ode["rmse"]), "max": float(ode["max"])}
        if "fid-digits" in row.metrics:
            out["fid_digits"] = float(row.metrics["fid-digits"])
        out["eval_s"] = round(time.perf_counter() - t0, 1)
        return out

    def seed_mse(
        self, name: str, model: DiffusionModel, solver: str, n: int, sigmas: list[float], model_sigmas: Any
    ) -> list[float]:
        """Each held-out seed's mean squared error against the teacher (for the paired bootstrap of the tables)."""
        key = (name, solver, n)
        if key not in self.validators:
            self.validators[key] = GridValidator(model, get_solver(solver).identity(), range(n))
        v = self.validators[key]
        out = v.outputs(sigmas, model_sigmas).to(torch.float64)
        return [float(e) for e in ((out - v.targets.to(torch.float64)) ** 2).flatten(1).mean(1)]

    def fill_seed_mse(self) -> None:
        """Per-seed errors for rows written before they were recorded (their grids are in the JSON)."""
        todo = [r for r in self.rows if "sigmas" in r and "seed_mse" not in r and r["model"] != TINY_LATENT]
        models: dict[str, DiffusionModel] = {}
        for r in todo:
            m = models.setdefault(r["model"], load_model(r["model"]))
            n = self.args.heldout
            r["seed_mse"] = self.seed_mse(r["model"], m, r["solver"], n, r["sigmas"], r.get("model_sigmas"))
        if todo:
            self.save()

    def run_model(self, name: str, model: DiffusionModel) -> None:
        a = self.args
        latent = name == TINY_LATENT
        n = a.latent_heldout if latent else a.heldout
        metrics = ["ode-error"]
        if "fid-digits" in a.metrics and tuple(model.shape) == (1, 8, 8) and "digits" in model.id:
            if importlib.util.find_spec("torch_fidelity") is not None:
                metrics.append("fid-digits")
            else:
                print("note: torch-fidelity is not installed: no fid-digits", flush=True)
        optimizers = a.latent_optimizers if latent else a.optimizers
        for solver in a.solvers:
            ident = get_solver(solver).identity()
            for nfe in a.nfe:
                steps = get_solver(solver).steps_for_nfe(ident, nfe, "none")
                for kind in a.baselines:
                    self.one(
                        name,
                        model,
                        solver,
                        nfe,
                        kind,
                        n,
                        metrics,
                        functools.partial(baseline_schedule, kind, model, ident, steps),
                    )
                for col in optimizers:
                    opt, overrides = OPTIMIZERS[col]
                    extra = dict(overrides)
                    if latent and opt == "ld3":  # few pairs: the path, not the numbers
                        extra.update(n_train=a.latent_pairs, n_valid=a.latent_pairs)

                    def make(o: str = opt, e: dict[str, Any] = extra, s: str = solver, k: int = nfe) -> Schedule:
                        return api.optimize(model, solver=s, nfe=k, optimizer=o, **e)

                    self.one(name, model, solver, nfe, col, n, metrics, make, optimizer=True)

    def one(
        self,
        name: str,
        model: DiffusionModel,
        solver: str,
        nfe: int,
        method: str,
        n: int,
        metrics: list[str],
        make: Callable[[], Schedule],
        *,
        optimizer: bool = False,
    ) -> None:
        if (name, solver, nfe, method) in self.done:
            return
        row: dict[str, Any] = {"model": name, "solver": solver, "nfe": nfe, "method": method, "optimizer": optimizer}
        t0 = time.perf_counter()
        try:
            with counting(model) as count:
                sched = make()
        except StepoptError as e:  # a refusal: its one line goes in the table
            row["refused"] = str(e)
        else:
            if optimizer:
                report = sched.method.config.get("report") or {}
                row["seconds"] = round(time.perf_counter() - t0, 1)
                row["evals"] = count[0]
                row["report_evals"] = report_evals(report)
                row["report"] = summary(report)
                row["objective"] = json_safe(dict(sched.method.objective or {}))
            row.update(self.score(model, f"{method}", sched, n, metrics))
            row["seed_mse"] = self.seed_mse(name, model, solver, n, list(sched.sigmas), sched.model_sigmas)
            row["sigmas"] = list(sched.sigmas)
            if sched.model_sigmas is not None:
                row["model_sigmas"] = list(sched.model_sigmas)
        print(
            json_text({k: v for k, v in row.items() if k not in ("sigmas", "model_sigmas", "report", "seed_mse")}),
            flush=True,
        )
        self.rows.append(row)
        self.done.add((name, solver, nfe, method))
        self.save()


def fmt_evals(r: dict[str, Any]) -> str:
    rep = r.get("report_evals")
    tot = rep.get("total") if isinstance(rep, dict) else rep
    return f"{r['evals']} ({'n/a' if tot is None else tot})"


def compare(r: dict[str, Any], b: dict[str, Any], resamples: int = 2000) -> str:
    """``r``'s RMSE relative to ``b``'s, with a 95 % paired bootstrap interval over the seeds and the share of
    seeds on which ``r`` is better (when both rows hold their per-seed errors)."""
    rel = f"{100 * (r['rmse'] / b['rmse'] - 1):+.1f} %"
    if "seed_mse" not in r or "seed_mse" not in b or len(r["seed_mse"]) != len(b["seed_mse"]):
        return rel
    x, y = np.asarray(r["seed_mse"]), np.asarray(b["seed_mse"])
    if np.array_equal(x, y):
        return f"{rel} (the same grid)"
    c = paired_bootstrap(x, y, resamples=resamples)
    return f"{rel} [{100 * c.low:+.1f}, {100 * c.high:+.1f}], {100 * c.better:.0f} %"


def tables(rows: list[dict[str, Any]], heldout: int) -> str:
    """Per model: error (rmse, fid-digits) per cell, then wall time and evaluations of each optimizer, then
    the acceptance check (each optimizer vs the best baseline, relative)."""
    out: list[str] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        cells = list(dict.fromkeys((r["solver"], r["nfe"]) for r in mrows))
        methods = list(dict.fromkeys(r["method"] for r in mrows))
        fid = any("fid_digits" in r for r in mrows)
        by = {(r["solver"], r["nfe"], r["method"]): r for r in mrows}
        out.append(f"\n### {model}: RMSE against the teacher" + (" / fid-digits" if fid else "") + "\n")
        out.append("| solver, NFE | " + " | ".join(methods) + " |")
        out.append("|---|" + "---:|" * len(methods))
        for s, nfe in cells:
            vals = [by[(s, nfe, m)].get("rmse") for m in methods if (s, nfe, m) in by]
            best = min((v for v in vals if v is not None), default=None)
            cs = []
            for m in methods:
                r = by.get((s, nfe, m))
                if r is None:
                    cs.append("")
                elif "refused" in r:
                    cs.append("refused")
                else:
                    v = f"{r['rmse']:.4f}"
                    v = f"**{v}**" if r["rmse"] == best else v
                    cs.append(v + (f" / {r['fid_digits']:.2f}" if "fid_digits" in r else ""))
            out.append(f"| {s} {nfe} | " + " | ".join(cs) + " |")
        opts = [m for m in methods if any(r["method"] == m and r["optimizer"] for r in mrows)]
        if opts:
            out.append(f"\n{model}: optimizer wall time, s / network evaluations counted (report's `network_evals`)\n")
            out.append("| solver, NFE | " + " | ".join(opts) + " |")
            out.append("|---|" + "---:|" * len(opts))
            for s, nfe in cells:
                cs = []
                for m in opts:
                    r = by.get((s, nfe, m))
                    cs.append("" if r is None or "refused" in r else f"{r['seconds']:.0f} / {fmt_evals(r)}")
                out.append(f"| {s} {nfe} | " + " | ".join(cs) + " |")
            n = next((len(r["seed_mse"]) for r in mrows if "seed_mse" in r), heldout)
            out.append(
                f"\n{model}: each optimizer's RMSE relative to the best baseline (+ = worse) on {n} held-out"
                " seeds, [95 % paired bootstrap interval], share of the seeds on which it is better\n"
            )
            out.append("| solver, NFE | best baseline | " + " | ".join(opts) + " |")
            out.append("|---|---|" + "---:|" * len(opts))
            for s, nfe in cells:
                bl = [r for r in mrows if (r["solver"], r["nfe"]) == (s, nfe) and not r["optimizer"] and "rmse" in r]
                if not bl:
                    continue
                b = min(bl, key=lambda r: r["rmse"])
                cs = []
                for m in opts:
                    r = by.get((s, nfe, m))
                    cs.append("" if r is None or "rmse" not in r else compare(r, b))
                out.append(f"| {s} {nfe} | {b['method']} {b['rmse']:.4f} | " + " | ".join(cs) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="builtin:unet-digits,tiny-latent")
    ap.add_argument("--solvers", default="dpmpp-3m,unipc")
    ap.add_argument("--nfe", default="5,8")
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--latent-optimizers", default="trust-region,trust-region-select,ld3")
    ap.add_argument("--heldout", type=int, default=512, help="held-out seeds 0..N-1")
    ap.add_argument("--latent-heldout", type=int, default=16, help="held-out seeds of the tiny latent pipeline")
    ap.add_argument("--latent-pairs", type=int, default=8, help="ld3's training and validation pairs on it")
    ap.add_argument("--metrics", default="ode-error,fid-digits")
    ap.add_argument("--out", type=Path, default=Path("out/bench_networks.json"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out, skip those entries")
    ap.add_argument("--table-only", action="store_true", help="print the tables of --out and stop")
    ap.add_argument("--merge", nargs="*", default=[], help="JSON files of other runs whose rows join --out's")
    ap.add_argument(
        "--quick", action="store_true", help="one cell (dpmpp-3m 5), edm and kl-optimal, trust-region, 32 seeds"
    )
    args = ap.parse_args()
    if args.quick:
        args.models, args.solvers, args.nfe = "builtin:unet-digits", "dpmpp-3m", "5"
        args.baselines, args.optimizers, args.heldout = "edm,kl-optimal", "trust-region", 32
        if args.out == Path("out/bench_networks.json"):
            args.out = Path("out/bench_networks_quick.json")
    args.models, args.solvers = csv(args.models), csv(args.solvers)
    args.nfe = [int(v) for v in csv(args.nfe)]
    args.baselines, args.metrics = csv(args.baselines), csv(args.metrics)
    args.optimizers, args.latent_optimizers = csv(args.optimizers), csv(args.latent_optimizers)
    for o in (*args.optimizers, *args.latent_optimizers):
        if o not in OPTIMIZERS:
            print(f"error: unknown optimizer column '{o}'; expected some of {', '.join(OPTIMIZERS)}", file=sys.stderr)
            return 1
    bench = Bench(args)
    if args.table_only:
        bench.fill_seed_mse()
        bench.save()
    else:
        for name in args.models:
            with tempfile.TemporaryDirectory() as tmp:
                model = tiny_latent_model(Path(tmp)) if name == TINY_LATENT else load_model(name)
                bench.run_model(name, model)
    print(tables(bench.rows, args.heldout))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

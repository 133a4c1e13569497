"""``stepopt eval``: evaluate schedules side by side and write the table; ``stepopt cache``: the disk cache."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from stepopt.cache_sections import SECTIONS
from stepopt.cli.app import (
    SEED_MAX,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    GuidanceOpt,
    JsonOpt,
    NegativePromptOpt,
    NetDtype,
    PromptFileOpt,
    PromptOpt,
    TrustCodeOpt,
    TrustPickleOpt,
    check_seed_range,
    command,
    emit_json,
    err,
)
from stepopt.cli.common import check_writable, load_with_options
from stepopt.config import resolve_config
from stepopt.errors import StepoptError
from stepopt.metrics import INCEPTION_EXTRACTOR, MANAGED_FIDELITY_OPTIONS, METRIC_NAMES
from stepopt.schedule import Schedule, is_published
from stepopt.trust import check_file_model


@command("eval")
def eval_cmd(
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="FILE",
            help="Schedule files (or published:NAME), all for the same model; or use -S.",
            show_default=False,
        ),
    ] = None,
    schedule: Annotated[
        list[Path] | None,
        typer.Option("--schedule", "-S", metavar="FILE", help="A schedule file (repeatable), as the arguments."),
    ] = None,
    metrics: Annotated[
        str, typer.Option("--metrics", help=f"Comma-separated metrics: {', '.join(METRIC_NAMES)}.")
    ] = "ode-error",
    n: Annotated[int, typer.Option("--n", min=2, help="Number of samples (sample i uses seed SEED + i).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="First seed.")] = 0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Batch size (results do not depend on it).")
    ] = 256,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the table: .md, .csv or .json (by extension).")
    ] = None,
    write_back_: Annotated[
        bool, typer.Option("--write-back", help="Store each metric with its settings in the schedule file.")
    ] = False,
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            help="Reference set for fid/kid/prc: an image folder, an .npz of mu/sigma (EDM format), or a"
            " torch-fidelity dataset name [default for *-digits: the real digits].",
        ),
    ] = None,
    feature_extractor: Annotated[
        str, typer.Option("--feature-extractor", help="torch-fidelity extractor for fid/kid/isc/prc.")
    ] = INCEPTION_EXTRACTOR,
    feature_weights: Annotated[
        Path | None,
        typer.Option(
            "--feature-weights",
            help="Weights file of --feature-extractor [default for Inception-v3: torch's hub cache].",
        ),
    ] = None,
    fidelity_set: Annotated[
        list[str] | None,
        typer.Option(
            "--fidelity-set",
            metavar="KEY=VALUE",
            help="A torch-fidelity option KEY=VALUE, e.g. kid_subsets=50 (repeatable).",
        ),
    ] = None,
    teacher_set: Annotated[
        list[str] | None,
        typer.Option(
            "--teacher-set",
            metavar="KEY=VALUE",
            help="Teacher option for networks KEY=VALUE, e.g. steps=200 (repeatable).",
        ),
    ] = None,
    versus: Annotated[
        str | None,
        typer.Option(
            "--versus",
            metavar="FILE",
            help="Compare every schedule's ode-error with this one (one of the files), seed by seed: relative"
            " RMSE change, its 95 % paired bootstrap interval, share of seeds on which it is better.",
        ),
    ] = None,
    resamples: Annotated[
        int, typer.Option("--resamples", min=1, help="Bootstrap resamples of --versus (seeded: reproducible).")
    ] = 2000,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the on-disk cache.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = NetDtype.float32,
    trust_code: TrustCodeOpt = False,
    trust_pickle: TrustPickleOpt = False,
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    negative_prompt: NegativePromptOpt = None,
    guidance: GuidanceOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Evaluate schedules side by side (ode-error, fd-exact, FID/KID/IS/PRC by torch-fidelity); write a table."""
    check_seed_range(seed, n)
    paths = [*(schedule or ()), *(files or ())]
    if not paths:
        raise typer.BadParameter("no schedules to evaluate: pass schedule files as arguments or with -S FILE")
    items = [(str(p), Schedule.load(p)) for p in paths]
    if versus is not None:
        same = [p for p, _ in items if p == versus or Path(p).resolve() == Path(versus).resolve()]
        if not same:
            raise StepoptError(f"--versus {versus}: not one of the schedules evaluated here; pass it as a FILE too")
        versus = same[0]
        if "ode-error" not in [m.strip() for m in metrics.split(",")]:
            raise StepoptError("--versus compares the ode-error of each seed: add ode-error to --metrics")
    if out is not None:
        check_writable(out, "--out")
    if write_back_:
        for p, _ in items:
            if is_published(p):
                raise StepoptError(f"--write-back: {p} ships with stepopt and is read-only; copy it first")
            check_writable(Path(p), "--write-back")
    trust = trust_code or trust_pickle
    for path, s in items:  # before any heavy import or work: a file's model id must not run code
        check_file_model(s.model.id, path, trust, model_option=False)
    # torch-fidelity (and torchvision behind it) load only when evaluating: other commands stay fast.
    from stepopt.evaluate import EvalConfig, evaluate, render_markdown, rows_json, write_back, write_table
    from stepopt.metrics.fidelity import FidelityOptions
    from stepopt.teacher import TeacherConfig

    sets = list(fidelity_set or ())
    keys = [s.partition("=")[0].strip() for s in sets]
    managed = [k for k in keys if k in MANAGED_FIDELITY_OPTIONS]
    if managed:
        raise StepoptError(
            f"--fidelity-set {managed[0]}: set by stepopt eval itself (use --metrics, --batch-size, --device,"
            " --feature-extractor, --feature-weights, --no-cache)"
        )
    if out is not None and out.suffix not in (".md", ".csv", ".json"):
        raise StepoptError(f"--out {out}: unknown table format '{out.suffix}'; expected .md, .csv or .json")
    fopts = resolve_config(FidelityOptions, None, sets)
    tcfg = resolve_config(TeacherConfig, None, teacher_set or ())
    cfg = EvalConfig(
        n=n,
        seed=seed,
        batch_size=batch_size,
        teacher=tcfg,
        cache=not no_cache,
        feature_extractor=feature_extractor,
        feature_weights=None if feature_weights is None else str(feature_weights),
        reference=reference,
        fidelity=fopts,
        versus=versus,
        resamples=resamples,
    )
    recorded = items[0][1].method.config.get("conditioning")
    loaded = load_with_options(
        items[0][1].model.id,
        device=device,
        dtype=dtype.value,
        trust_code=trust,
        prompts=prompt,
        prompt_file=prompt_file,
        negative_prompt=negative_prompt,
        guidance=guidance,
        recorded=recorded if isinstance(recorded, dict) else None,
    )
    model, dev = loaded.model, loaded.device
    for note in loaded.notes:
        err.print(f"note: {note}", markup=False)

    teacher_start: dict[str, int] = {}

    def progress(event: str, data: Mapping[str, Any]) -> None:
        if event == "teacher":
            rng = f"sigma {data['sigma_from']:.6g} -> {data['sigma_to']:.6g}"
            done, total = data["done"], data["total"]
            if rng not in teacher_start:
                teacher_start[rng] = done
                what = f"{total - done} of {total} seeds to compute, {done} from the cache"
                err.print(f"teacher ({rng}): {what}", markup=False)
            elif done > teacher_start[rng]:
                err.print(f"teacher ({rng}): {done}/{total} seeds", markup=False)
        elif event == "teacher-done":
            rng = f"sigma {data['sigma_from']:.6g} -> {data['sigma_to']:.6g}"
            err.print(f"teacher ({rng}): done in {data['seconds']:.1f} s (not part of the rows' times)", markup=False)
        elif event == "schedule":
            s = data["schedule"]
            err.print(
                f"[{data['index'] + 1}/{data['total']}] {data['path']}: {s.method.name}, {s.solver}, NFE {s.nfe}",
                markup=False,
            )

    rows = evaluate(items, metrics, model, cfg, device=dev, progress=progress)
    if loaded.conditioning is not None:  # the guided ODE the samples come from
        for r in rows:
            for st in r.settings.values():
                st["conditioning"] = loaded.conditioning
    if write_back_:
        for r in rows:
            write_back(r)
            err.print(f"wrote metrics into {r.path}", markup=False)
    if out is not None:
        write_table(rows, out)
        err.print(f"wrote {out}", markup=False)
    err.print(f"{model.id}: {n} samples, seeds {seed}..{seed + n - 1}", markup=False)
    err.print(render_markdown(rows), markup=False, end="")
    if json_out:
        emit_json(rows_json(rows))


class CacheAction(str, Enum):
    info = "info"
    clear = "clear"


@command("cache")
def cache_cmd(
    action: Annotated[CacheAction, typer.Argument(help="info: sizes per section; clear: delete.")] = CacheAction.info,
    section: Annotated[
        str | None, typer.Option("--section", help=f"Only this section: {', '.join(SECTIONS)} [default: all].")
    ] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show or clear stepopt's disk cache ($STEPOPT_CACHE_DIR, else the user cache dir): teacher outputs, FID stats."""
    from stepopt.cache import cache_info, clear_cache

    if section is not None and section not in SECTIONS:
        raise StepoptError(f"--section {section}: expected one of {', '.join(SECTIONS)}")
    if action is CacheAction.clear:
        removed = clear_cache(section)
        if json_out:
            emit_json({"removed": removed, "section": section})
        err.print(f"removed {removed['files']} files, {removed['bytes'] / 1e6:.2f} MB", markup=False)
        return
    info = cache_info()
    if json_out:
        emit_json(info)
    err.print(f"cache: {info['root']} ({info['bytes'] / 1e6:.2f} MB)", markup=False)
    for name, s in info["sections"].items():
        if section is None or section == name:
            err.print(f"  {name}: {s['entries']} entries, {s['files']} files, {s['bytes'] / 1e6:.2f} MB", markup=False)

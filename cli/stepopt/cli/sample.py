"""``stepopt sample``: generate samples with exactly a schedule's solver and grid."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
from stepopt.cli.common import check_writable, load_with_options, model_slug
from stepopt.errors import StepoptError
from stepopt.schedule import Schedule

if TYPE_CHECKING:
    from stepopt.sampling import ProgressFn

SAMPLES_DIR = Path("samples")
NPZ_NAME = "samples.npz"


def resolve_out(out: Path | None, schedule: Schedule) -> Path:
    """``F.npz`` as given; a directory (existing, or a path without suffix) gets ``DIR/samples.npz``.

    Default: ``samples/<model>/<solver>/nfe<N>/<method>.npz``, mirroring the schedules folder.
    """
    if out is None:
        s = schedule
        return SAMPLES_DIR / model_slug(s.model.id) / s.solver.name / f"nfe{s.nfe}" / f"{s.method.name}.npz"
    if out.is_dir() or not out.suffix:
        return out / NPZ_NAME
    if out.suffix != ".npz":
        raise StepoptError(f"--out {out}: expected a .npz file or a directory")
    return out


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(n: int, shape: tuple[int, ...], latent: bool) -> None:
    """Refuse an ``--n`` whose samples cannot fit in memory before any work (all are kept to write the .npz)."""
    per = 4 * math.prod(shape) * (3 if latent else 2)  # float32 samples, plus the states / the array written
    need = n * per
    have = physical_memory()
    if have is not None and need > have:
        raise StepoptError(
            f"--n {n}: {n} samples of shape {'x'.join(map(str, shape))} need about {need / 1e9:.3g} GB,"
            f" more than this machine's {have / 1e9:.3g} GB of memory; sample fewer at a time with --n and --seed"
        )


@command("sample")
def sample(
    schedule: Annotated[
        Path,
        typer.Option("--schedule", "-S", metavar="FILE", help="The schedule file (or published:NAME) to sample with."),
    ],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of samples.")] = 64,
    seed: Annotated[
        int, typer.Option("--seed", min=0, max=SEED_MAX, help="Sample i starts from the noise of seed S+i.")
    ] = 0,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", min=1, help="Samples per batch (the noise of each sample does not depend on it)."),
    ] = 64,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="F.npz or DIR (writes DIR/samples.npz) [default: samples/<model>/<solver>/nfe<N>/<method>.npz].",
        ),
    ] = None,
    grid: Annotated[
        Path | None, typer.Option("--grid", help="Also write a PNG grid of up to 64 samples (image data).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model id [default: the schedule's model.id].")
    ] = None,
    device: DeviceOpt = "auto",
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Sample even if the model or solver does not match the schedule (recorded as a warning)."
        ),
    ] = False,
    trust_code: TrustCodeOpt = False,
    trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = NetDtype.float32,
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    negative_prompt: NegativePromptOpt = None,
    guidance: GuidanceOpt = None,
    decode: Annotated[
        bool | None,
        typer.Option(
            "--decode/--no-decode",
            help="Decode latents to images with the VAE; 'samples' then holds images, 'latents' the states "
            "[default: on for latent models].",
        ),
    ] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Generate samples with exactly the schedule's solver and grid; write .npz (and a PNG grid)."""
    from stepopt.trust import check_code_loader, check_file_model

    # Every check that needs no model comes before the heavy imports: a mistake costs nothing.
    check_seed_range(seed, n)
    sched = Schedule.load(schedule)
    path = resolve_out(out, sched)
    check_writable(path, "--out")
    if grid is not None:
        if grid.suffix.lower() != ".png":
            raise StepoptError(f"--grid {grid}: expected a .png file")
        check_writable(grid, "--grid")
    recorded = sched.method.config.get("conditioning")
    recorded = recorded if isinstance(recorded, dict) else None
    if model is None:
        check_file_model(sched.model.id, schedule, trust_code or trust_pickle)
    check_code_loader(model or sched.model.id, trust_code or trust_pickle)

    import torch

    from stepopt.images import is_image_shape, save_grid
    from stepopt.models.diffusers import conditioning_mismatches
    from stepopt.sampling import sample_schedule, save_samples, schedule_mismatches

    loaded = load_with_options(
        model or sched.model.id,
        device=device,
        dtype=dtype.value,
        trust_code=trust_code or trust_pickle,
        prompts=prompt,
        prompt_file=prompt_file,
        negative_prompt=negative_prompt,
        guidance=guidance,
        recorded=recorded,
    )
    m, dev, record = loaded.model, loaded.device, loaded.conditioning
    has_decoder = m.image_shape is not None  # a latent model with its VAE
    if decode and not has_decoder:
        raise StepoptError(f"--decode: {m.id} has no decoder (only latent diffusers pipelines have a VAE)")
    decoding = has_decoder and decode is not False
    out_shape = m.image_shape if decoding and m.image_shape is not None else m.shape
    if grid is not None and not is_image_shape(out_shape):
        hint = " (decode latents with --decode)" if has_decoder else ""
        raise StepoptError(f"--grid: {m.id} has data of shape {out_shape}, not images (C, H, W) with C = 1 or 3{hint}")
    problems, notes = conditioning_mismatches(recorded, record)
    warnings = schedule_mismatches(sched, m) + problems
    if warnings and not force:
        raise StepoptError(f"{schedule}: {warnings[0]}; pass --force to sample anyway")
    for w in warnings:
        err.print(f"warning: {w} (--force)", style="yellow", markup=False)
    for note in loaded.notes + notes:
        err.print(f"note: {note}", markup=False)
    check_memory(n, tuple(out_shape), has_decoder)
    seeds = [seed + i for i in range(n)]

    t0 = time.perf_counter()
    with _ProgressBar(n) as progress, torch.inference_mode():
        x = sample_schedule(m, sched, seeds, batch_size=batch_size, device=dev, progress=progress)
        images = m.decode(x, batch_size=batch_size) if decoding else None
    seconds = time.perf_counter() - t0
    arrays: dict[str, object] = {}
    per_seed = m.cond_for_seeds(seeds)
    if record is not None:  # which prompt each sample used, the prompt set, and the states before decoding
        if per_seed is not None and "prompt_index" in per_seed:
            arrays["prompt_index"] = per_seed["prompt_index"].numpy()
        arrays["conditioning"] = json.dumps({**record, "prompts": m.conditioning_prompts()})
    if images is not None:
        arrays["latents"] = x.to(torch.float32).numpy()
    data = images if images is not None else x
    save_samples(path, data, seeds, sched, schedule_path=schedule, model_id=m.id, warnings=warnings, extra=arrays)
    if grid is not None:
        save_grid(grid, data.to(torch.float32).numpy())
    if json_out:
        emit_json(
            {
                "path": str(path),
                "grid": None if grid is None else str(grid),
                "n": n,
                "seed": seed,
                "batch_size": batch_size,
                "nfe": sched.nfe,
                "seconds": seconds,
                "schedule": str(schedule),
                "model": m.id,
                "solver": sched.solver.to_dict(),
                "device": str(dev),
                "dtype": dtype.value,
                "decoded": images is not None,
                "conditioning": record,
                "warnings": warnings,
            }
        )
    extra = f" and {grid}" if grid is not None else ""
    err.print(
        f"wrote {path}{extra}: {n} samples of {m.id}, solver {sched.solver}, NFE {sched.nfe}, in {seconds:.2f} s",
        markup=False,
    )


class _ProgressBar:
    """A rich progress bar on a terminal (stderr); elsewhere a no-op. Yields the library callback."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Progress | None = None

    def __enter__(self) -> ProgressFn | None:
        if not err.is_terminal:
            return None
        self.bar = Progress(
            TextColumn("sampling"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task("sampling", total=self.total)
        bar = self.bar

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

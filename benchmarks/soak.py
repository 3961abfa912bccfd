"""Soak: an endless source through the Pipeline for a while, sampling the process's resident memory.

The source loops a real encoded clip (three LFW people walking through a 640x360 scene, H.264, the
test suite's clip) without end, frame indices continuing across loops, so tracks keep starting and
ending as on a camera that never stops. Every frame's result is streamed to disk as JSON lines, as
petal-run does (REPORT.frames.jsonl). RSS is sampled every few seconds; growth is measured from the
end of a warm-up (caches, ONNX Runtime arenas and the first tracks settle) to the end.

    nice -n 19 python benchmarks/soak.py                     # 600 s, JSON to benchmarks/results/soak.json
    python benchmarks/soak.py --seconds 60 --json /tmp/soak.json

Target (issue 11): RSS growth <= 5 % over 10 minutes, every frame on disk.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from machine import cpu_name, load_average  # noqa: E402

from petal_runtime.cli import _FramesLog  # noqa: E402
from petal_runtime.files import atomic_write_text  # noqa: E402
from petal_runtime.sources import Frame, Source, VideoFileSource  # noqa: E402

GROWTH_TARGET_PERCENT = 5.0


def rss_mb() -> float:
    """Resident set size of this process now (Linux /proc), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class LoopedClip(Source):
    """A video file played again and again until `seconds` have passed (or stop()); indices and times
    continue across loops, as one endless stream."""

    def __init__(self, path: Path, seconds: float) -> None:
        super().__init__(f"loop:{path}")
        self.path = Path(path)
        self.deadline = time.monotonic() + seconds
        self.loops = 0
        with VideoFileSource(self.path) as probe:
            self.fps, self.size = probe.fps, probe.size

    def frames(self) -> Iterator[Frame]:
        offset, period = 0, 1.0 / (self.fps or 25.0)
        while not self._closed.is_set() and time.monotonic() < self.deadline:
            with VideoFileSource(self.path) as clip:
                seen = 0
                for frame in clip.frames():
                    if self._closed.is_set() or time.monotonic() >= self.deadline:
                        return
                    self.stats.frames += 1
                    seen += 1
                    yield dataclasses.replace(frame, index=offset + frame.index,
                                              time=(offset + frame.index) * period)
            offset += seen
            self.loops += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the stream runs (default 600)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the baseline RSS sample")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "soak.json"))
    parser.add_argument("--frames-out", default=str(Path(tempfile.gettempdir()) / "petal-soak.frames.jsonl"),
                        help="the JSON-lines log of every frame (default: in the temporary folder)")
    args = parser.parse_args()
    if args.warmup >= args.seconds:
        parser.error("--warmup must be shorter than --seconds")

    import runtime_support as rs
    from petal_runtime.pipeline import Pipeline

    models = rs.exported_models()
    gallery = rs.lfw_gallery(models)
    clip = rs.lfw_clip()
    frames_out = Path(args.frames_out)
    frames_out.parent.mkdir(parents=True, exist_ok=True)
    load_before = load_average()

    samples: list[tuple[float, float, int]] = []  # (seconds, RSS MB, frames)
    with Pipeline.from_dir(models, gallery) as pipeline:
        source = LoopedClip(clip.path, args.seconds)
        log = _FramesLog(frames_out)
        start = next_sample = time.monotonic()
        try:
            for result in pipeline.run(source):
                log.write(result.to_dict())
                now = time.monotonic()
                if now >= next_sample:
                    samples.append((round(now - start, 1), round(rss_mb(), 1), log.count))
                    next_sample = now + args.sample_every
        finally:
            log.close()
            source.close()
        samples.append((round(time.monotonic() - start, 1), round(rss_mb(), 1), log.count))
        tracks = len(pipeline.tracker.tracks)
        forgotten = pipeline.tracker.forgotten
        stats = pipeline.stats

    baseline = next(s for s in samples if s[0] >= args.warmup)
    final = samples[-1]
    growth = 100.0 * (final[1] - baseline[1]) / baseline[1]
    lines_on_disk = sum(1 for _ in open(frames_out, encoding="utf-8"))
    elapsed = final[0]
    row = {
        "seconds": elapsed, "frames": final[2], "fps": round(final[2] / elapsed, 2), "loops": source.loops,
        "rss_mb_baseline": baseline[1], "rss_at_s": baseline[0], "rss_mb_final": final[1],
        "rss_mb_max": max(s[1] for s in samples), "rss_growth_percent": round(growth, 2),
        "target_percent": GROWTH_TARGET_PERCENT, "within_target": growth <= GROWTH_TARGET_PERCENT,
        "frames_on_disk": lines_on_disk, "frames_file_mb": round(frames_out.stat().st_size / 1e6, 2),
        "tracks_held": tracks, "tracks_forgotten": forgotten, "dropped_frames": stats.dropped_frames,
        "clip": str(clip.path.name), "cpu": cpu_name(), "load": [load_before, load_average()],
        "samples": samples,
    }
    atomic_write_text(Path(args.json), json.dumps(row, indent=1))
    print(f"| {elapsed:.0f} s | {final[2]} frames ({row['fps']} fps, {source.loops} loops) | "
          f"RSS {baseline[1]:.0f} MB at {baseline[0]:.0f} s -> {final[1]:.0f} MB (max {row['rss_mb_max']:.0f}) | "
          f"growth {growth:+.2f} % (target <= {GROWTH_TARGET_PERCENT:.0f} %) | "
          f"{lines_on_disk} frames on disk ({row['frames_file_mb']} MB) |")
    print(f"wrote {args.json} and {frames_out}")
    return 0 if lines_on_disk == final[2] else 1


if __name__ == "__main__":
    sys.exit(main())

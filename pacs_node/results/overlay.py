"""Results for viewers that cannot show DICOM-SEG.

- A Grayscale Softcopy Presentation State (PS3.3 A.33.1, built by highdicom ``pr``) on the source
  series: one graphic layer per segment, in the segment's colour, holding closed polylines of its
  contour on every slice it touches, plus a text layer saying the result is the model's (one
  annotation over all those slices). Each source image's IOD is checked by highdicom once, not
  again for every annotation on it (:class:`_Annotation`), which kept a long series' GSPS slow.
- A key-image series: colour secondary-capture images (highdicom ``sc``) of a few key slices (the
  slice of largest area per segment, capped at ``ResultOptions.key_images``; or every slice with a
  finding on request), with contours, a legend and "AI result - verify before use" burned in,
  the banner above the image and the legend below or beside it, never over image pixels.
  The legend names each structure as :attr:`Finding.label` does (laterality only for paired
  structures, the same words as the SR, PDF and FHIR) and prints its warnings (a left/right
  conflict, a structure in several pieces) under it, in amber.

Contours come from scikit-image ``find_contours`` at level 0.5 on each slice's mask, simplified
to a half-pixel tolerance (Douglas-Peucker, by shapely: the marching-squares staircase goes,
the outline stays; a contour that simplifying would turn into a line or a sliver, as a finding of
a pixel or two, keeps its trace); one POLYLINE per contour. Pixel coordinates follow PS3.3
C.10.5.1.2 (0,0 is the top-left corner of the top-left pixel, so a pixel centre is index + 0.5).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import shapely
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from skimage import measure as _skimage_measure  # type: ignore[import-untyped,unused-ignore]

from pacs_node.imaging.volume import Volume
from pacs_node.inference.labelmap import Labelmap
from pacs_node.outputs import OutputKind
from pacs_node.results.measurements import Finding, segment_boxes
from pacs_node.results.provenance import (
    CHARSET,
    Provenance,
    source_patient_orientation,
    utf8_sources,
)

measure: Any = _skimage_measure  # untyped library: typed at this one seam

DISCLAIMER = "AI result - verify before use"
_MIN_RENDER_PX = 512
_SIMPLIFY_PX = 0.5  # the traced staircase's own half pixel: far fewer points, same outline
_TEXT_LAYER = "AI_NOTICE"
WARNING_RGB = (255, 190, 0)
_FONT_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
)

Polyline = NDArray[np.float64]  # (n, 2) as (column, row) in DICOM pixel coordinates


@dataclass(frozen=True)
class Window:
    """The grey-level window images are shown and rendered with."""

    center: float
    width: float


def window_for(volume: Volume) -> Window:
    """The source's own window when it has one, a soft-tissue window on CT, else percentiles."""
    header = volume.headers[0]
    center, width = header.get("WindowCenter"), header.get("WindowWidth")
    if center is not None and width is not None:
        first_c = (
            center[0] if isinstance(center, Sequence) and not isinstance(center, str) else center
        )
        first_w = width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width
        return Window(float(first_c), max(float(first_w), 1.0))
    if volume.modality.upper() == "CT":
        return Window(40.0, 400.0)
    low, high = np.percentile(volume.voxels, [1, 99])
    return Window(float((low + high) / 2), max(float(high - low), 1.0))


def slice_contours(mask: NDArray[np.bool_]) -> list[Polyline]:
    """Closed polylines around a 2D mask, (column, row) in DICOM pixel coordinates."""
    rows_any, cols_any = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows_any.size == 0:
        return []
    top, left = int(rows_any[0]), int(cols_any[0])
    crop = mask[top : int(rows_any[-1]) + 1, left : int(cols_any[-1]) + 1]
    padded = np.pad(crop.astype(np.float32), 1)
    traced = measure.find_contours(padded, 0.5)
    # Douglas-Peucker in GEOS: the same simplification as scikit-image's, a hundred times faster
    simplified = shapely.simplify(
        np.array([shapely.linestrings(c) for c in traced], dtype=object),
        _SIMPLIFY_PX,
        preserve_topology=False,
    )
    out: list[Polyline] = []
    for trace, line in zip(traced, simplified, strict=True):
        simple = _kept_shape(trace, shapely.get_coordinates(line))
        rows = simple[:, 0] - 1 + top + 0.5
        cols = simple[:, 1] - 1 + left + 0.5
        points = np.column_stack([cols, rows])
        if not np.allclose(points[0], points[-1]):
            points = np.vstack([points, points[:1]])
        out.append(points)
    return out


def _area(points: NDArray[np.float64]) -> float:
    """The shoelace area of a closed (or to-be-closed) polygon."""
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _kept_shape(trace: NDArray[np.float64], simple: NDArray[np.float64]) -> NDArray[np.float64]:
    """The simplified contour, or the traced one where simplifying would lose the shape: a
    finding of a pixel or two has a trace of a few points only, which a half-pixel tolerance
    turns into a line or a sliver (under 4 distinct corners, or under half the traced area)."""
    distinct = len({(float(r), float(c)) for r, c in simple})
    if distinct < 4 or _area(simple) < 0.5 * _area(trace):
        return np.asarray(trace, dtype=np.float64)
    return simple


def key_slices(
    labelmap: Labelmap, findings: Sequence[Finding], count: int, every: bool
) -> list[int]:
    """Slice indices to show: the largest cross-section of each finding, or every finding slice."""
    present = [f.segment.value for f in findings if f.present]
    if not present:
        return []
    found = np.isin(labelmap.labels, present)
    per_slice = np.count_nonzero(found, axis=(1, 2))
    if every:
        return [int(z) for z in np.flatnonzero(per_slice)]
    boxes = segment_boxes(labelmap)
    chosen: list[int] = []
    for value in present:
        box = boxes.get(value)
        if box is None:
            continue
        areas = np.count_nonzero(labelmap.labels[box] == value, axis=(1, 2))
        z = int(np.argmax(areas)) + int(box[0].start)
        if z not in chosen:
            chosen.append(z)
    chosen.sort(key=lambda z: -int(per_slice[z]))
    return sorted(chosen[: max(count, 0)])


def _layer_name(number: int, name: str) -> str:
    text = f"SEG{number:02d} {name}".upper()
    cleaned = "".join(ch if ch.isalnum() or ch in " _" else "_" for ch in text)
    return cleaned[:16].strip()


class _Annotation(hd.pr.GraphicAnnotation):
    """A Graphic Annotation (PS3.3 C.10.5.1) over images whose references were built and
    checked by highdicom once per SOP Class (:class:`_References`).

    highdicom's own constructor looks each referenced image's IOD up in its tables again for
    every annotation (is it an image, is it multi-frame): with one annotation per segment and
    slice that was most of a presentation state's cost on a long series, for the same answer
    each time. This one keeps highdicom's other checks (objects built by highdicom, their
    coordinates checked against the image by highdicom's own rule) and is a
    :class:`highdicom.pr.GraphicAnnotation`, so the presentation state's constructor takes it.
    """

    def __init__(
        self,
        references: Sequence[Dataset],
        image: Dataset,
        layer: hd.pr.GraphicLayer,
        graphic_objects: Sequence[hd.pr.GraphicObject] = (),
        text_objects: Sequence[hd.pr.TextObject] = (),
    ) -> None:
        Dataset.__init__(self)  # not highdicom's: its image checks were done for ``references``
        if not references or not (graphic_objects or text_objects):
            raise ValueError("an annotation needs an image and a graphic or text object")
        self.GraphicLayer = layer.GraphicLayer
        # items of highdicom's own ReferencedImageSequence, checked once (see _References)
        self.ReferencedImageSequence = list(references)  # type: ignore[assignment]
        for graphic in graphic_objects:
            self._check_coords(graphic.graphic_data, image, graphic.units)
        for text in text_objects:
            if text.bounding_box is not None:
                box = np.array(text.bounding_box).reshape((2, 2))
                self._check_coords(box, image, text.units)
        if graphic_objects:
            self.GraphicObjectSequence = list(graphic_objects)
        if text_objects:
            self.TextObjectSequence = list(text_objects)


class _References:
    """Referenced Image Sequence items (PS3.3 C.10.5.1): the first single-frame and the first
    multi-frame image of each SOP Class through highdicom, which checks that the class is an
    image; the others the same way without asking again. A frame number is checked against
    each image's own Number of Frames."""

    def __init__(self) -> None:
        self.checked: set[tuple[str, bool]] = set()  # (SOP Class UID, multi-frame) seen

    def item(self, image: Dataset, frame: int | None) -> Dataset:
        sop_class = str(image.SOPClassUID)
        multi = "NumberOfFrames" in image
        if frame is not None:
            frames = int(image.NumberOfFrames) if multi else 0
            if not 1 <= frame <= frames:
                raise ValueError(
                    f"frame {frame} of an image of {sop_class} with {frames or 'no'} frames"
                )
        if (sop_class, multi) not in self.checked:
            (item,) = hd.content.ReferencedImageSequence(
                referenced_images=[image], referenced_frame_number=frame
            )
            self.checked.add((sop_class, multi))
            return Dataset(item)
        item = Dataset()
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        item.ReferencedSOPClassUID = image.SOPClassUID
        if frame is not None:
            item.ReferencedFrameNumber = frame
        return item


def build_presentation_state(
    volume: Volume,
    labelmap: Labelmap,
    findings: Sequence[Finding],
    numbering: dict[int, int],
    provenance: Provenance,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """A GSPS over the whole source series with one contour layer per segment found: one
    annotation per segment and slice, one POLYLINE per contour; the notice is one annotation
    over every annotated image of the same size."""
    sources = utf8_sources(volume)
    references = _References()
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    layers: list[hd.pr.GraphicLayer] = []
    annotations: list[hd.pr.GraphicAnnotation] = []
    annotated: set[str] = set()
    boxes = segment_boxes(labelmap)
    order = 1
    for finding in findings:
        number = numbering.get(finding.segment.value)
        if number is None or not finding.present:
            continue
        structure = finding.segment.structure
        layer = hd.pr.GraphicLayer(
            layer_name=_layer_name(number, structure.name),
            order=order,
            description=layer_description(finding),
            display_color=hd.color.CIELabColor.from_rgb(*structure.color),
        )
        order += 1
        layers.append(layer)
        box = boxes.get(finding.segment.value)
        if box is None:
            continue
        first = int(box[0].start)
        mask = np.asarray(labelmap.labels[first : box[0].stop] == finding.segment.value)
        for k in np.flatnonzero(mask.any(axis=(1, 2))):
            z = first + int(k)
            uid = volume.sop_instance_uids[z]
            if not uid:
                continue
            objects = [
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=points,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                )
                for points in slice_contours(mask[int(k)])
            ]
            if objects:
                image = by_uid[uid]
                item = references.item(image, _frame(volume, z))
                annotations.append(_Annotation([item], image, layer, objects))
                annotated.add(uid)
    notice = hd.pr.GraphicLayer(layer_name=_TEXT_LAYER, order=order, description=DISCLAIMER)
    layers.append(notice)
    text = f"{DISCLAIMER} ({provenance.algorithm.name} {provenance.algorithm.version})"[:64]
    for images in _notice_groups([by_uid[uid] for uid in sorted(annotated)], volume):
        rows, columns = int(images[0].Rows), int(images[0].Columns)
        corners = (1.0, 1.0, float(columns) - 1, min(16.0, rows - 1.0))
        annotations.append(
            _Annotation(
                [references.item(image, None) for image in images],
                images[0],
                notice,
                text_objects=[
                    hd.pr.TextObject(
                        text_value=text,
                        units=hd.pr.AnnotationUnitsValues.PIXEL,
                        bounding_box=corners,
                    )
                ],
            )
        )
    window = window_for(volume)
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=sources,
        series_instance_uid=provenance.series_uid(OutputKind.GSPS),
        series_number=provenance.options.series_number(OutputKind.GSPS),
        sop_instance_uid=provenance.instance_uid(OutputKind.GSPS),
        instance_number=provenance.options.instance_number,
        manufacturer="pacs-node",
        manufacturer_model_name="pacs-node",
        software_versions=provenance.software_version,
        device_serial_number=provenance.options.device_serial_number,
        content_label="AI_CONTOURS",
        content_description=provenance.description("AI contours")[:64],
        graphic_annotations=annotations or None,
        graphic_layers=layers,
        institution_name=provenance.options.institution_name,
        voi_lut_transformations=[
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=window.center, window_width=window.width
            )
        ],
        contributing_equipment=[provenance.contributing_equipment()],
        specific_character_set=CHARSET,
        series_description=provenance.description("AI PR"),
    )
    state.Laterality = sources[0].get("Laterality", "")  # type 2C: dciodvfy asks for it
    return state


def _notice_groups(images: Sequence[Dataset], volume: Volume) -> list[list[Dataset]]:
    """The annotated images in groups that one annotation may reference (PS3.3 C.10.5.1: the
    same series and size; a multi-frame image alone, its notice on every frame)."""
    if volume.frame_numbers and any(n is not None for n in volume.frame_numbers):
        return [[image] for image in images]
    groups: dict[tuple[str, int, int], list[Dataset]] = {}
    for image in images:
        key = (str(image.SeriesInstanceUID), int(image.Rows), int(image.Columns))
        groups.setdefault(key, []).append(image)
    return list(groups.values())


def _frame(volume: Volume, z: int) -> int | None:
    return volume.frame_numbers[z] if z < len(volume.frame_numbers) else None


# --------------------------------------------------------------------------- burned-in images


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in _FONT_PATHS:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


PixelBox = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)


@dataclass(frozen=True)
class KeyImageLayout:
    """Where a key image's parts lie on its canvas: the banner above the image, the legend below
    it (landscape and square images) or beside it (portrait ones). No part covers another, so
    the legend never hides image pixels."""

    size: tuple[int, int]  # canvas width, height
    banner: PixelBox
    image: PixelBox
    legend: PixelBox | None  # None: nothing to list


def key_image_layout(
    width: int, height: int, line: int, legend_rows: Callable[[int], int]
) -> KeyImageLayout:
    """The layout for a ``width`` x ``height`` rendered slice, text lines ``line`` pixels high;
    ``legend_rows(panel_width)`` says how many lines the legend takes wrapped at that width."""
    banner_height = line + 6
    top = banner_height
    image = (0, top, width, top + height)
    beside = height > width
    panel_width = max(width, 16 * line) if beside else width
    rows = legend_rows(panel_width)
    if rows == 0:
        return KeyImageLayout((width, top + height), (0, 0, width, top), image, None)
    panel_height = rows * line + 12
    if beside:
        canvas = (width + panel_width, top + max(height, panel_height))
        legend = (width, top, width + panel_width, canvas[1])
    else:
        canvas = (width, top + height + panel_height)
        legend = (0, top + height, width, canvas[1])
    return KeyImageLayout(canvas, (0, 0, canvas[0], top), image, legend)


def render_slice(
    volume: Volume,
    labelmap: Labelmap,
    z: int,
    findings: Sequence[Finding],
    provenance: Provenance,
) -> Image.Image:
    """One slice as an RGB picture: windowed grey, contours, legend and the disclaimer."""
    return render_slice_layout(volume, labelmap, z, findings, provenance)[0]


def render_slice_layout(
    volume: Volume,
    labelmap: Labelmap,
    z: int,
    findings: Sequence[Finding],
    provenance: Provenance,
) -> tuple[Image.Image, KeyImageLayout]:
    """:func:`render_slice`'s picture and where its parts lie on it."""
    window = window_for(volume)
    plane = volume.voxels[z].astype(np.float64)
    low = window.center - window.width / 2
    grey = np.clip((plane - low) / window.width * 255.0, 0, 255).astype(np.uint8)
    rows, cols = grey.shape
    scale = max(1, int(np.ceil(_MIN_RENDER_PX / max(rows, cols))))
    image = Image.fromarray(grey, mode="L").resize((cols * scale, rows * scale)).convert("RGB")
    draw = ImageDraw.Draw(image)
    width = max(2, scale // 2)
    shown: list[Finding] = []
    for finding in findings:
        if not finding.present:
            continue
        color = finding.segment.structure.color
        mask = np.asarray(labelmap.labels[z] == finding.segment.value)
        for points in slice_contours(mask):
            xy = [(float(c) * scale, float(r) * scale) for c, r in points]
            draw.line(xy, fill=color, width=width, joint="curve")
        if mask.any():
            shown.append(finding)
    font = _font(max(12, image.height // 40))
    line = int(font.size * 1.3) if isinstance(font, ImageFont.FreeTypeFont) else 14
    char = max(draw.textlength("n", font=font), 1)
    entries = legend_entries(shown)

    def wrapped(panel_width: int) -> list[tuple[tuple[int, int, int] | None, str, bool]]:
        """The legend's lines at this panel width: (swatch, text, warning)."""
        columns = max(20, int((panel_width - 18 - line) / char))
        lines: list[tuple[tuple[int, int, int] | None, str, bool]] = []
        for entry in entries:
            parts = textwrap.wrap(entry.text, columns) or [entry.text]
            lines.append((entry.color, parts[0], entry.warning))
            lines.extend((None, more, entry.warning) for more in parts[1:])
        return lines

    layout = key_image_layout(image.width, image.height, line, lambda w: len(wrapped(w)))
    canvas = Image.new("RGB", layout.size, (0, 0, 0))
    canvas.paste(image, layout.image[:2])
    draw = ImageDraw.Draw(canvas)
    banner = f"{DISCLAIMER} - {provenance.algorithm.name} {provenance.algorithm.version}"
    draw.text((layout.banner[0] + 6, layout.banner[1] + 3), banner, fill=(255, 220, 0), font=font)
    if layout.legend is not None:
        left, top, right, _ = layout.legend
        for i, (swatch, text, warning) in enumerate(wrapped(right - left)):
            y = top + 6 + i * line
            if swatch is not None:
                draw.rectangle((left + 6, y + 2, left + line, y + line - 4), fill=swatch)
            fill = WARNING_RGB if warning else (255, 255, 255)
            draw.text((left + 12 + line, y), text, fill=fill, font=font)
    return canvas, layout


@dataclass(frozen=True)
class LegendEntry:
    """One legend line: a finding (with its colour swatch) or one of its warnings (no swatch)."""

    color: tuple[int, int, int] | None
    text: str

    @property
    def warning(self) -> bool:
        return self.color is None


def legend_entries(findings: Sequence[Finding]) -> list[LegendEntry]:
    """The key-image legend of these findings: "<label>: <volume or area>", each followed by
    its warnings ("! ..."). Labels and laterality words are :attr:`Finding.label`'s, as in the
    PDF table, the SR finding sites and the FHIR text."""
    entries: list[LegendEntry] = []
    for finding in findings:
        if not finding.present:
            continue
        size = finding.size_text()
        text = f"{finding.label}: {size}" if size else finding.label
        entries.append(LegendEntry(finding.segment.structure.color, text))
        entries.extend(LegendEntry(None, f"! {warning}") for warning in finding.warnings())
    return entries


def layer_description(finding: Finding) -> str:
    """The GSPS layer's description: the finding's label, and "check" when it has warnings."""
    text = finding.label
    if finding.side_conflict:
        text += " - check side"
    if finding.fragmented:
        text += f" - {finding.components} parts"
    return text[:64]


def _orientation_letters(vector: NDArray[np.float64]) -> str:
    """The dominant patient direction of an image axis (highdicom takes one letter per axis)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    i = int(np.argmax(np.abs(vector)))
    return letters[i][0] if vector[i] > 0 else letters[i][1]


def build_key_images(
    volume: Volume,
    labelmap: Labelmap,
    findings: Sequence[Finding],
    provenance: Provenance,
) -> list[hd.sc.SCImage]:
    """Secondary-capture key images with contours, legend and disclaimer burned in."""
    options = provenance.options
    slices = key_slices(
        labelmap, findings, options.key_images, options.key_images_every_finding_slice
    )
    sources = utf8_sources(volume)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    direction = np.asarray(volume.direction)
    orientation = (_orientation_letters(direction[:, 0]), _orientation_letters(direction[:, 1]))
    images: list[hd.sc.SCImage] = []
    for index, z in enumerate(slices):
        source = by_uid.get(volume.sop_instance_uids[z]) or sources[0]
        picture = render_slice(volume, labelmap, z, findings, provenance)
        pixels = np.asarray(picture, dtype=np.uint8)
        own = source_patient_orientation(source)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=provenance.series_uid(OutputKind.KEY_IMAGES),
            series_number=options.series_number(OutputKind.KEY_IMAGES),
            sop_instance_uid=provenance.instance_uid(OutputKind.KEY_IMAGES, index),
            instance_number=options.instance_number + index,
            manufacturer="pacs-node",
            patient_orientation=(own[0][0], own[1][0]) if own else orientation,
            series_description=provenance.description("AI Key images"),
            specific_character_set=CHARSET,
            contributing_equipment=[provenance.contributing_equipment()],
        )
        image.BurnedInAnnotation = "YES"
        if own is not None:
            image.PatientOrientation = own
        image.Laterality = source.get("Laterality", "")  # type 2C: dciodvfy asks for it
        image.SourceImageSequence = [_source_item(source)]
        images.append(image)
    return images


def _source_item(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item

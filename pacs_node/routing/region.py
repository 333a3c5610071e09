"""The body region a series shows, derived for routing from whatever evidence its headers give.

Evidence is taken in this order, the first that names a region winning:

1. Body Part Examined (0018,0015): a defined term (PS3.16 Annex L; ``CHESTABDPELVIS`` names three
   regions) or a common local spelling (``THORAX``, ``ABD``, ``SCHAEDEL``);
2. keywords in the descriptions, most specific first: series description, protocol name, study
   description, requested procedure, procedure code (English abbreviations such as ``CAP``,
   ``TAP``, ``ABD/PELV``, and common German and French terms);
3. the geometry of an axial volume: its extent along the slice normal and its reconstructed field
   (see the thresholds below). Geometry can only tell a head-sized volume from a torso-sized
   cross-section; it never names a part of the torso, so it says ``TORSO``.

Regions are Body Part Examined terms: ``HEAD``, ``NECK``, ``CHEST``, ``ABDOMEN``, ``PELVIS``,
``SPINE``, ``EXTREMITY``, ``BREAST``, ``WHOLEBODY``, plus ``TORSO`` (torso-sized, part unknown:
only geometry says it). A series may show several. The result keeps the evidence it came from,
so that ``routes explain`` can say it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

HEAD, NECK, CHEST, ABDOMEN, PELVIS = "HEAD", "NECK", "CHEST", "ABDOMEN", "PELVIS"
SPINE, EXTREMITY, BREAST, WHOLEBODY, TORSO = "SPINE", "EXTREMITY", "BREAST", "WHOLEBODY", "TORSO"
REGIONS = (HEAD, NECK, CHEST, ABDOMEN, PELVIS, SPINE, EXTREMITY, BREAST, WHOLEBODY, TORSO)

HEAD_MAX_FIELD_MM = 280.0
"""An adult head is about 150-200 mm wide and is reconstructed on a 200-250 mm field; a field
wider than this holds more than a head. (A knee, a heart or a child's torso reconstructed on a
small field also passes this test: geometry alone cannot tell them apart.)"""

HEAD_MAX_Z_MM = 250.0
"""From the skull base (or the chin) to the vertex is about 200-230 mm; a volume longer than this
along the slice normal reaches into the neck or below."""

TORSO_MIN_FIELD_MM = 300.0
"""An adult chest, abdomen or pelvis is 300-400 mm wide and is reconstructed on a 320-500 mm field;
no head protocol needs one this wide. Between the head and torso limits geometry says nothing."""

AXIAL_MIN_COSINE = 0.8
"""The slice normal within about 37 degrees of the patient's feet-head axis: axial slices, gantry
tilt included. Only then is the in-plane field a cross-section of the body."""

_TRUNK = (CHEST, ABDOMEN, PELVIS)


def _table(text: str, joiner: str) -> tuple[tuple[tuple[str, ...], str], ...]:
    """``REGION [REGION...]: entry`` lines; an indented line continues the last one."""
    lines: list[str] = []
    for line in text.strip().splitlines():
        if line.startswith(" ") and lines:
            lines[-1] += joiner + line.strip()
        else:
            lines.append(line.strip())
    rows = []
    for line in lines:
        regions, entry = line.split(":", 1)
        rows.append((tuple(regions.split()), entry.strip()))
    return tuple(rows)


# Body Part Examined terms (upper case, separators removed) and the regions each names.
_BODY_PART_TERMS = _table(
    """
HEAD: HEAD BRAIN SKULL CEREBELLUM CIRCLEOFWILLIS ORBIT EYE EAR IAC FACE NOSE JAW MAXILLA MANDIBLE
    MOUTH ZYGOMA SCALP SINUS SINUSES PITUITARY SELLA TEMPORALBONE CRANIUM SCHAEDEL SCHADEL KOPF
    CRANE TETE
HEAD NECK: HEADNECK HEADANDNECK
NECK: NECK LARYNX PHARYNX THYROID PAROTID SUBMANDIBULAR CAROTID HALS COU
NECK CHEST: NECKCHEST
NECK CHEST ABDOMEN: NECKCHESTABDOMEN NECKCHESTABD
NECK CHEST ABDOMEN PELVIS: NECKCHESTABDPELV NECKCHESTABDPELVIS
CHEST: CHEST THORAX LUNG LUNGS HEART MEDIASTINUM CORONARYARTERY BRONCHUS TRACHEA STERNUM RIB RIBS
    THYMUS CARDIAC TORAX
CHEST ABDOMEN: CHESTABDOMEN CHESTABD THORAXABDOMEN THORAXABD AORTA
CHEST ABDOMEN PELVIS: CHESTABDPELVIS CHESTABDOMENPELVIS CHESTABDPELV THORAXABDOMENPELVIS
    THORAXABDPELVIS CAP TAP TORSO TRUNK
ABDOMEN: ABDOMEN ABD ABDO LIVER KIDNEY KIDNEYS PANCREAS SPLEEN STOMACH GALLBLADDER ADRENAL DUODENUM
    JEJUNUM ILEUM COLON BAUCH OBERBAUCH LEBER NIERE
ABDOMEN PELVIS: ABDOMENPELVIS ABDPELVIS ABDPELV ABDOMENBECKEN
PELVIS: PELVIS BLADDER PROSTATE UTERUS OVARY CERVIX RECTUM BECKEN BASSIN
SPINE: SPINE CSPINE TSPINE LSPINE SSPINE CTSPINE TLSPINE LSSPINE SACRUM COCCYX
EXTREMITY: EXTREMITY ARM LEG KNEE ANKLE FOOT HAND WRIST ELBOW SHOULDER HIP FEMUR HUMERUS THIGH CALF
    FINGER THUMB TOE PATELLA CALCANEUS CLAVICLE SCAPULA TIBIA FIBULA FOREARM UPPEREXTREMITY
    LOWEREXTREMITY UPPERLIMB LOWERLIMB
BREAST: BREAST MAMMA
WHOLEBODY: WHOLEBODY TOTALBODY
""",
    " ",
)
_BODY_PARTS = {term: regions for regions, terms in _BODY_PART_TERMS for term in terms.split()}

# Keywords in descriptions: regular expressions over normalised text (upper case, accents
# dropped, every run of other characters one space), tried in this order; each consumes what it
# matched, so "THORACIC SPINE" is spine and not chest, "HEAD AND NECK" not read again as a head.
_KEYWORDS = _table(
    """
WHOLEBODY: WHOLE ?BODY|TOTAL ?BODY|GANZ ?KO?E?RPER|CORPS ENTIER
SPINE: (?:CERVICAL|THORACIC|LUMBAR|SACRAL|THORACOLUMBAR) SPINE|[CTLS] ?SPINE|SPINE|HWS|BWS|LWS
    |WIRBELSA?E?ULE|RACHIS
CHEST ABDOMEN PELVIS: CAP|TAP|C A P|T A P|CHEST ABD(?:OMEN)? PELV(?:IS)?
    |THORAX ABD(?:OMEN)? (?:PELV(?:IS)?|BECKEN)|THORACO ABDOMINO PELVIEN(?:NE)?|TORSO|TRUNK
HEAD NECK: HEAD ?NECK|HEAD AND NECK|KOPF HALS
HEAD: HEAD|BRAIN|SKULL|CRANIAL|CRANIUM|CEREBRAL|CEREBRUM|SINUS(?:ES)?|ORBITS?|FACIAL|FACE|IAC
    |PETROUS|TEMPORAL BONES?|MAXILLOFACIAL|DENTAL|CCT|SCHA?E?DEL|KOPF|HIRN|NASENNEBENHO?E?HLEN|NNH
    |CRANE|CERVEAU|TETE|ENCEPHALE
NECK: NECK|HALS|COU|THYROID|LARYNX|PHARYNX|SCHILDDRU?E?SE
CHEST: CHEST|THORAX|THORACIC|THORACO|THX|TORAX|LUNGS?|LUNGE|PULMONARY|CTPA|CARDIAC|CORONARY|HEART
    |HERZ|POUMONS?|PULMONAIRE|COEUR
ABDOMEN: ABDOMEN|ABD|ABDO|ABDOMINAL|ABDOMINO|LIVER|PANCREAS|KIDNEYS?|RENAL|UROGRAM|BAUCH|OBERBAUCH
    |LEBER|NIEREN?|FOIE
PELVIS: PELVIS|PELV|PELVIC|PELVIEN(?:NE)?|BECKEN|BASSIN|PROSTATE|BLADDER
EXTREMITY: EXTREMITY|EXTREMITIES|KNEE|ANKLE|FOOT|FEET|HAND|WRIST|ELBOW|SHOULDER|HIP|FEMUR|TIBIA
    |HUMERUS|FOREARM|LEG|ARM|KNIE|FUSS|SCHULTER|HU?E?FTE|SPRUNGGELENK|ELLENBOGEN|GENOU|CHEVILLE
    |EPAULE|POIGNET|PIED|COUDE|HANCHE
BREAST: BREAST|MAMMA|SEIN
""",
    "",
)
_PATTERNS = tuple(
    (re.compile(rf"(?<![A-Z0-9])(?:{words})(?![A-Z0-9])"), regions) for regions, words in _KEYWORDS
)


def _normalise(text: str) -> str:
    """Upper case, accents dropped (ä -> A, é -> E), every run of other characters one space."""
    decomposed = unicodedata.normalize("NFKD", text.upper())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(re.split(r"[^A-Z0-9]+", plain)).strip()


def _ordered(regions: set[str]) -> tuple[str, ...]:
    return tuple(r for r in REGIONS if r in regions)


def regions_in_text(text: str) -> tuple[str, ...]:
    """The regions the keywords of a free-text description name (empty when none)."""
    remaining = f" {_normalise(text)} "
    found: set[str] = set()
    for pattern, regions in _PATTERNS:
        if pattern.search(remaining):
            found.update(regions)
            remaining = pattern.sub(" ", remaining)
    return _ordered(found)


def regions_of_body_part(value: str) -> tuple[str, ...]:
    """The regions a Body Part Examined value names: a defined term, else its keywords."""
    term = re.sub(r"[^A-Z0-9]", "", _normalise(value))
    if term in _BODY_PARTS:
        return _ordered(set(_BODY_PARTS[term]))
    return regions_in_text(value)


@dataclass(frozen=True)
class Geometry:
    """What the headers say of a volume's size, in mm (``None`` where they do not say)."""

    z_extent_mm: float | None  # along the slice normal, first to last slice plus one slice
    field_mm: (
        float | None
    )  # the reconstructed field (Reconstruction Diameter, else the image width)
    axial: bool  # the slices are axial (see AXIAL_MIN_COSINE)

    def describe(self) -> str:
        z = "unknown" if self.z_extent_mm is None else f"{self.z_extent_mm:.0f} mm"
        field = "unknown" if self.field_mm is None else f"{self.field_mm:.0f} mm"
        return f"z extent {z}, field {field}"


def regions_of_geometry(geometry: Geometry) -> tuple[str, ...]:
    """HEAD for a small field of head-sized length, TORSO for a torso-sized cross-section."""
    if not geometry.axial or geometry.field_mm is None:
        return ()
    if geometry.field_mm >= TORSO_MIN_FIELD_MM:
        return (TORSO,)
    if (
        geometry.field_mm <= HEAD_MAX_FIELD_MM
        and geometry.z_extent_mm is not None
        and geometry.z_extent_mm <= HEAD_MAX_Z_MM
    ):
        return (HEAD,)
    return ()


SERIES_DESCRIPTION = "series description"
"""The one description that speaks of this series alone; the others (protocol, study, request,
procedure code) may name every region a whole examination covers."""


def _settled(found: BodyRegion, geometry: Geometry | None) -> BodyRegion:
    """Evidence that may speak of the whole examination ("CT HEAD AND CHEST", a polytrauma
    protocol, WHOLEBODY) names the head beside the torso: this series' own size says which of
    them it shows, so a head reconstruction is never sent to a torso model for the study's
    words. Without usable geometry the evidence stands as read."""
    regions = set(found.regions)
    mixed = WHOLEBODY in regions or (HEAD in regions and bool(regions & {*_TRUNK, TORSO}))
    if not mixed or geometry is None:
        return found
    sized = regions_of_geometry(geometry)
    if sized == (HEAD,):
        return BodyRegion(
            (HEAD,), f"{found.evidence}; this series is head-sized: {geometry.describe()}"
        )
    if sized == (TORSO,) and HEAD in regions:
        kept = _ordered(regions - {HEAD, NECK}) or (TORSO,)
        return BodyRegion(
            kept, f"{found.evidence}; this series is torso-sized: {geometry.describe()}"
        )
    return found


@dataclass(frozen=True)
class BodyRegion:
    """The regions a series shows (empty: unknown) and the evidence they were read from."""

    regions: tuple[str, ...]
    evidence: str

    def __str__(self) -> str:
        shown = "\\".join(self.regions) if self.regions else "unknown"
        return f"{shown} ({self.evidence})"


def body_region(
    body_part: str | None,
    descriptions: Sequence[tuple[str, str]],
    geometry: Geometry | None,
) -> BodyRegion:
    """Derive the body region: Body Part Examined, else the descriptions (``(what, text)``, most
    specific first), else the geometry; see the module docstring."""
    gaps: list[str] = []
    if body_part:
        regions = regions_of_body_part(body_part)
        if regions:
            return _settled(BodyRegion(regions, f"Body Part Examined {body_part!r}"), geometry)
        gaps.append(f"Body Part Examined {body_part!r} names no known region")
    for what, text in descriptions:
        regions = regions_in_text(text)
        if regions:
            found = BodyRegion(regions, "; ".join([*gaps, f"{what} {text!r}"]))
            return found if what == SERIES_DESCRIPTION else _settled(found, geometry)
    if not body_part and not descriptions:
        gaps = ["no body part or description"]
    else:
        gaps.append("no description" if not descriptions else "no description names a region")
        if not body_part:
            gaps.insert(0, "no body part")
    if geometry is None:
        return BodyRegion((), "; ".join([*gaps, "no usable geometry"]))
    if not geometry.axial:
        return BodyRegion((), "; ".join([*gaps, "not an axial volume"]))
    regions = regions_of_geometry(geometry)
    detail = geometry.describe() + ("" if regions else ": neither head- nor torso-sized")
    return BodyRegion(regions, "; ".join([*gaps, detail]))

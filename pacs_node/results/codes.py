"""Every coded concept the result objects carry, in one place, so SR, FHIR and the PDF agree.

Standard codes come from DICOM PS3.16 (SCT, DCM, UCUM) as pydicom's code dictionary spells them.
Concepts no standard names (sphericity, component count, extents along the patient axes, the
intensity of a non-CT image, surface area) use the private coding scheme ``99PACSNODE`` below,
declared in each SR's Coding Scheme Identification Sequence: "99" starts a private scheme
designator (PS3.16 section 8), so no code is ever invented inside a standard scheme.

FHIR renders the same concepts with the systems in :data:`FHIR_SYSTEMS`.
"""

from __future__ import annotations

from pacs_node.inference.vocabulary import CodedConcept

# ---------------------------------------------------------------- the private coding scheme

PRIVATE_SCHEME = "99PACSNODE"
PRIVATE_SCHEME_NAME = "pacs-node measurement codes"
# uuid5(NAMESPACE_URL, "urn:pacs-node:coding-scheme:99PACSNODE") as a 2.25 UID
PRIVATE_SCHEME_UID = "2.25.303416372765853343858289611578676997168"
PRIVATE_FHIR_SYSTEM = "urn:oid:2.25.303416372765853343858289611578676997168"

SPHERICITY = CodedConcept("SPHERICITY", PRIVATE_SCHEME, "Sphericity")
COMPONENT_COUNT = CodedConcept("COMPONENTS", PRIVATE_SCHEME, "Number of connected components")
SURFACE_AREA = CodedConcept("SURFACE-AREA", PRIVATE_SCHEME, "Surface area of mesh")
EXTENT_LR = CodedConcept("EXTENT-LR", PRIVATE_SCHEME, "Extent along left-right axis")
EXTENT_AP = CodedConcept("EXTENT-AP", PRIVATE_SCHEME, "Extent along anterior-posterior axis")
EXTENT_SI = CodedConcept("EXTENT-SI", PRIVATE_SCHEME, "Extent along superior-inferior axis")
IMAGE_INTENSITY = CodedConcept("INTENSITY", PRIVATE_SCHEME, "Source image intensity")

# ---------------------------------------------------------------- standard measurement concepts

VOLUME = CodedConcept("118565006", "SCT", "Volume")
AREA = CodedConcept("42798000", "SCT", "Area")
DIAMETER = CodedConcept("81827009", "SCT", "Diameter")
WIDTH = CodedConcept("103355008", "SCT", "Width")
HEIGHT = CodedConcept("121207", "DCM", "Height")
ATTENUATION = CodedConcept("112031", "DCM", "Attenuation Coefficient")

# Derivations (DICOM CID 7464, used with concept name 121401 "Derivation").
MEAN = CodedConcept("373098007", "SCT", "Mean")
STANDARD_DEVIATION = CodedConcept("386136009", "SCT", "Standard Deviation")
MINIMUM = CodedConcept("255605001", "SCT", "Minimum")
MAXIMUM = CodedConcept("56851009", "SCT", "Maximum")

# ---------------------------------------------------------------- units (UCUM)

MILLILITER = CodedConcept("mL", "UCUM", "milliliter")
MILLIMETER = CodedConcept("mm", "UCUM", "millimeter")
SQUARE_MILLIMETER = CodedConcept("mm2", "UCUM", "square millimeter")
SQUARE_CENTIMETER = CodedConcept("cm2", "UCUM", "square centimeter")
HOUNSFIELD = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNITS = CodedConcept("1", "UCUM", "no units")

# ---------------------------------------------------------------- report-level concepts

# The Purpose of Reference of the model's Contributing Equipment item, as IHE AIR and MONAI Deploy
# write it today (a DCM code is pending); kept here so it changes in one place.
PROCESSING_ALGORITHM = CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")
MODALITY_PROCEDURES: dict[str, CodedConcept] = {
    "CT": CodedConcept("77477000", "SCT", "Computed tomography"),
    "MR": CodedConcept("113091000", "SCT", "Magnetic resonance imaging"),
    "CR": CodedConcept("168537006", "SCT", "Plain radiography"),
    "DX": CodedConcept("168537006", "SCT", "Plain radiography"),
    "US": CodedConcept("16310003", "SCT", "Ultrasonography"),
    "MG": CodedConcept("71651007", "SCT", "Mammography"),
}
# FHIR DiagnosticReport.code and category.
DIAGNOSTIC_IMAGING_STUDY = CodedConcept("18748-4", "LN", "Diagnostic imaging study")
RADIOLOGY = CodedConcept("RAD", "v2-0074", "Radiology")

FHIR_SYSTEMS: dict[str, str] = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "LN": "http://loinc.org",
    "v2-0074": "http://terminology.hl7.org/CodeSystem/v2-0074",
    PRIVATE_SCHEME: PRIVATE_FHIR_SYSTEM,
}


def procedure_for(modality: str) -> CodedConcept:
    """The imaging procedure analysed (IHE AIR: the SR names it, not the algorithm)."""
    return MODALITY_PROCEDURES.get(modality.upper(), IMAGING_PROCEDURE)

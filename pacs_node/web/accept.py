"""The Accept header of a DICOMweb request, parsed once (RFC 9110 12.5.1, PS3.18 8.7): media
ranges in order of preference, each with its parameters (``type``, ``transfer-syntax``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class MediaRange:
    media_type: str  # lower case, e.g. "multipart/related", "image/png", "*/*"
    params: dict[str, str] = field(default_factory=dict)
    quality: float = 1.0

    @property
    def part_type(self) -> str | None:
        """``type`` of a multipart/related range (what each part is)."""
        value = self.params.get("type")
        return value.lower() if value else None

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


def _split(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of ``header``, best first; ``*/*`` alone when there is none."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    for item in _split(header, ","):
        pieces = [p.strip() for p in _split(item, ";")]
        if not pieces[0]:
            continue
        params: dict[str, str] = {}
        quality = 1.0
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
            elif name:
                params[name] = value
        if quality > 0:
            ranges.append(MediaRange(pieces[0].lower(), params, quality))
    return sorted(ranges, key=lambda r: -r.quality)

"""The AE title check shared by the node's own title, its peers and its destinations."""

from __future__ import annotations


def check_ae_title(value: str) -> str:
    """PS3.5 AE: 1-16 characters of the default repertoire, no backslash or control characters."""
    title = value.strip()
    if not title:
        raise ValueError("an AE title cannot be empty")
    if len(title) > 16:
        raise ValueError(f"an AE title has at most 16 characters, got {len(title)}")
    if any(ch == "\\" or ord(ch) < 0x20 or ord(ch) > 0x7E for ch in title):
        raise ValueError("an AE title may hold printable ASCII only, without backslash")
    return title

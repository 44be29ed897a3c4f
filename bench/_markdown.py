"""One rendered section of a Markdown file (``docs/BENCHMARKS.md``): a heading, then the rendered body between two
markers, so a renderer replaces only its own text. Shared by the ``bench/render_*_doc.py`` scripts."""

import re
from pathlib import Path


def put_section(doc: Path, heading: str, tag: str, body: str, before: str | None = None) -> None:
    """Write ``heading``, ``<!-- tag:begin -->``, ``body`` and ``<!-- tag:end -->`` into ``doc``: in place of the
    section when it is there, else before the line ``before`` (when given and found), else at the end."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    text = doc.read_text()
    section = f"{heading}\n\n{begin}\n{body}\n{end}\n"
    if begin in text:
        text = re.sub(rf"{re.escape(heading)}\n\n{re.escape(begin)}.*?{re.escape(end)}\n", lambda _: section, text,
                      flags=re.S)
    elif before is not None and f"\n{before}" in text:
        at = text.find(f"\n{before}")
        text = text[:at] + "\n" + section + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)

"""The text and value forms of the options shared by the command line, the explorer and the collectors: layer lists
and token positions. Pure parsing and checking; nothing here needs a model."""

from collections.abc import Sequence

from catlens.errors import unknown_name_message

READ_POSITIONS = ("last", "mean", "mean_all", "post_instruction")
"""The named token positions a collection can read (besides negative offsets from the end of the prompt)."""


def parse_layers(text: str | None) -> list[int] | None:
    """``"all"``/None -> None (every layer); ``"0-3,10,-1"`` -> [0, 1, 2, 3, 10, -1].

    >>> parse_layers("0-3,10,-1")
    [0, 1, 2, 3, 10, -1]
    >>> parse_layers("5-2")
    Traceback (most recent call last):
    ...
    ValueError: --layers '5-2': the range 5-2 is empty (its start is after its end); write it as '2-5'.
    """
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                start, stop = int(a), int(b)
                if start > stop:
                    raise ValueError(f"--layers {text!r}: the range {part} is empty (its start is after its end); "
                                     f"write it as '{stop}-{start}'.")
                out.extend(range(start, stop + 1))
            else:
                out.append(int(part))
        except ValueError as e:
            if str(e).startswith("--layers"):
                raise
            raise ValueError(f"--layers {text!r}: cannot read {part!r}; use 'all', single layers and ranges like "
                             f"'0-5,10,-1'.") from None
    repeated = sorted({x for x in out if out.count(x) > 1})
    if repeated:
        raise ValueError(f"--layers {text!r}: layer(s) {repeated} listed more than once; list each layer once.")
    return out


def parse_read_positions(positions: str | Sequence[int]) -> tuple[str, ...]:
    """The token positions a collection reads: one named position, or negative offsets from the end of the prompt,
    as the store's position labels.

    >>> parse_read_positions("last"), parse_read_positions([-3, -1])
    (('last',), ('-3', '-1'))
    """
    if isinstance(positions, str):
        if positions not in READ_POSITIONS:
            raise ValueError(unknown_name_message("positions", positions, READ_POSITIONS,
                                                  "Or give a sequence of negative offsets like (-2, -1)."))
        return (positions,)
    offsets = tuple(int(p) for p in positions)
    if not offsets or any(p >= 0 for p in offsets):
        raise ValueError(f"positions={positions!r}: explicit offsets must be negative (counted from the end of the "
                         f"prompt, -1 = last token), e.g. (-3, -2, -1).")
    if len(set(offsets)) != len(offsets):
        raise ValueError(f"positions={positions!r} has duplicates; give each offset once, e.g. (-3, -2, -1).")
    return tuple(str(p) for p in offsets)

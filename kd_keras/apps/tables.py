"""Tables of results, as aligned text (the command line) or markdown (the
benchmarks and reproductions)."""


def _cell(value, float_format):
    return format(value, float_format) if isinstance(value, float) else str(value)


def text_table(rows, columns, float_format=".4g"):
    """Rows (dicts) as columns of aligned text, with a header."""
    cells = [[_cell(row.get(c, ""), float_format) for c in columns] for row in rows]
    widths = [
        max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)
    ]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True))
        for line in cells
    ]
    return "\n".join(lines)


def markdown_table(rows, columns, float_format=".3f"):
    """Rows (dicts) as a markdown table of the given columns."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += [
        "| " + " | ".join(_cell(row.get(c, ""), float_format) for c in columns) + " |"
        for row in rows
    ]
    return "\n".join(lines)

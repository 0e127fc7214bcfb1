"""Sphinx extension: hide nbdev's `#|` directive lines from the book's readers.

The notebooks stay the single source (nbdev reads the directives when exporting); when Sphinx
reads a notebook for the book, the directive lines are removed from every code cell first, so
`#| export` never appears on a rendered page. Cells that contained nothing but directives
(e.g. `#| default_exp`) are tagged `remove-cell` and disappear.
"""
import json


def _strip(app, docname, source):
    if not str(app.env.doc2path(docname)).endswith(".ipynb"):
        return
    nb = json.loads(source[0])
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        lines = text.splitlines(keepends=True)
        kept = [line for line in lines if not line.lstrip().startswith("#|")]
        if len(kept) == len(lines):
            continue
        cell["source"] = "".join(kept).lstrip("\n")
        if not cell["source"].strip():
            tags = cell.setdefault("metadata", {}).setdefault("tags", [])
            if "remove-cell" not in tags:
                tags.append("remove-cell")
    source[0] = json.dumps(nb)


def setup(app):
    app.connect("source-read", _strip)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

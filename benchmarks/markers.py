"""`write_block`: how a benchmark puts its table into a Markdown file between its own markers."""

import os
import re


def write_block(path, text, marker):
    """Replaces the text between `<!-- marker -->` and `<!-- /marker -->` in `path` with `text`
    (adding the marked block at the end of the file, or creating it, if it has none)."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    content = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    block = f"{start}\n{text}\n{end}"
    if start in content:
        content = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, content,
                         flags=re.S)
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)

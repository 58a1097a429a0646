"""The report document and its Markdown and self-contained HTML renderings."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from reports.listening import Listening
from ttm.util import atomic_write

# ----------------------------------------------------------------------------- document


@dataclass
class Doc:
    title: str
    parts: list[tuple] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.parts.append(("h", text))

    def p(self, text: str) -> None:
        self.parts.append(("p", text))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.parts.append(("table", headers, rows))

    def img(self, name: str, png: bytes, alt: str) -> None:
        self.parts.append(("img", name, png, alt))

    def audio(self, lis: Listening) -> None:
        self.parts.append(("audio", lis))


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_md(doc: Doc, files_dir: Path) -> str:
    """Markdown; images are written to `files_dir` (beside the report), clips linked relative to it."""
    out = [f"# {doc.title}", ""]
    for part in doc.parts:
        kind = part[0]
        if kind == "h":
            out += [f"## {part[1]}", ""]
        elif kind == "p":
            out += [part[1], ""]
        elif kind == "table":
            _, headers, rows = part
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "---|" * len(headers))
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            _, name, png, alt = part
            atomic_write(files_dir / name, lambda tmp, png=png: Path(tmp).write_bytes(png))
            out += [f"![{alt}]({files_dir.name}/{name})", ""]
        elif kind == "audio":
            lis: Listening = part[1]
            if lis.captions:
                out.append("| caption | " + " | ".join(_md_cell(lab) for lab in lis.labels) + " |")
                out.append("|" + "---|" * (len(lis.labels) + 1))
                for cap in lis.captions:
                    cells = []
                    for lab in lis.labels:
                        c = lis.clips.get((cap, lab))
                        link = Path(os.path.relpath(c.path, files_dir.parent)).as_posix() if c else ""
                        cells.append(f"[wav]({link})" if c else "n/a (not generated)")
                    out.append(f"| {_md_cell(cap)} | " + " | ".join(cells) + " |")
                out.append("")
            if lis.note:
                out += [lis.note, ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0} img{max-width:100%;display:block;margin:1em 0} audio{width:220px}
.na{color:#999}
"""


def _html_cell(s: str) -> str:
    e = html.escape(str(s))
    return f'<span class="na">{e}</span>' if str(s).startswith("n/a") else e


def render_html(doc: Doc) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(doc.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for part in doc.parts:
        kind = part[0]
        if kind == "h":
            out.append(f"<h2>{html.escape(part[1])}</h2>")
        elif kind == "p":
            out.append(f"<p>{html.escape(part[1])}</p>")
        elif kind == "table":
            _, headers, rows = part
            out.append(
                "<table><thead><tr>"
                + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                + "</tr></thead><tbody>"
            )
            out += ["<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</tbody></table>")
        elif kind == "img":
            _, _name, png, alt = part
            out.append(
                f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            )
        elif kind == "audio":
            lis: Listening = part[1]
            if lis.captions:
                out.append(
                    "<table><thead><tr><th>caption</th>"
                    + "".join(f"<th>{html.escape(lab)}</th>" for lab in lis.labels)
                    + "</tr></thead><tbody>"
                )
                for cap in lis.captions:
                    cells = []
                    for lab in lis.labels:
                        c = lis.clips.get((cap, lab))
                        cells.append(
                            f'<audio controls preload="metadata" title="{html.escape(lab)}" '
                            f'src="data:audio/wav;base64,{c.wav_b64}"></audio>'
                            if c
                            else '<span class="na">n/a (not generated)</span>'
                        )
                    out.append(
                        f"<tr><td>{html.escape(cap)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                    )
                out.append("</tbody></table>")
            if lis.note:
                out.append(f"<p>{html.escape(lis.note)}</p>")
    out.append("</body></html>")
    return "\n".join(out)

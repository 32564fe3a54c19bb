"""MkDocs hook: turn arithmatex's TeX spans into MathML at build time, tidy Sphinx roles.

The Markdown writes math as ``$...$`` and ``$$...$$`` (GitHub renders those
too); ``pymdownx.arithmatex`` in generic mode wraps them in
``<span class="arithmatex">\\(...\\)</span>`` and
``<div class="arithmatex">\\[...\\]</div>``. This hook replaces each with
MathML from ``latex2mathml``, which browsers render natively: no JavaScript,
no CDN, the site builds and reads offline. A TeX command that latex2mathml
does not know fails the build instead of leaking into the page.

Headings with math: the table of contents is built from the heading's text
before this hook runs, so its entries would show the raw ``\\(...\\)``; they
get the same MathML. Doctest's ``<BLANKLINE>`` marker (an empty line in an
expected output) is a test artefact, shown as the empty line it stands for.

Docstrings may cross-reference with Sphinx roles (``:func:`fuse_bn```), which
mkdocstrings prints literally; they become plain code, linked when the object
is documented on the same page.
"""

from __future__ import annotations

import html
import re
from typing import Any

_INLINE = re.compile(r'<span class="arithmatex">\\\((.+?)\\\)</span>', re.DOTALL)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.+?)\\\]</div>', re.DOTALL)
_UNKNOWN_COMMAND = re.compile(r"<m[ion]>\\")
# A prime written W'_o becomes a superscript in MathML, which browsers draw tiny and high.
# Grouping it with its letter, {W\prime}_o, draws the prime at full size like in print.
_PRIME = re.compile(r"([A-Za-z])'")
# The toc extension stores a heading's text with tags stripped and HTML escaped.
_TOC_INLINE = re.compile(r"\\\((.+?)\\\)", re.DOTALL)
# <BLANKLINE> alone on a line of a highlighted code block (Pygments splits it into spans).
_BLANKLINE = re.compile(
    r"^(?:<span[^>]*>\s*</span>)?\s*(?:<span[^>]*>)?&lt;(?:</span>)?"
    r"(?:<span[^>]*>)?BLANKLINE(?:</span>)?(?:<span[^>]*>)?&gt;(?:</span>)?$",
    re.MULTILINE,
)
_ROLE = re.compile(r":(?:func|class|meth|attr|data|exc|mod|obj):<code>~?([\w.]+)</code>")


def _to_mathml(tex: str, *, display: str, page: str) -> str:
    from latex2mathml.converter import convert  # a docs-only dependency

    source = _PRIME.sub(r"{\1\\prime}", html.unescape(tex).strip())
    mathml = convert(source, display=display)
    if _UNKNOWN_COMMAND.search(mathml):
        raise ValueError(f"{page}: latex2mathml does not know a command in: {source}")
    return mathml


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
    """Replace the arithmatex output of one page (and of its TOC) with MathML."""
    name = str(page.file.src_uri)
    _toc_to_mathml(getattr(page, "toc", None) or [], page=name)
    html_text = _BLANKLINE.sub("", html_text)
    html_text = _BLOCK.sub(
        lambda m: (
            '<div class="math-block">'
            + _to_mathml(m.group(1), display="block", page=name)
            + "</div>"
        ),
        html_text,
    )
    html_text = _INLINE.sub(
        lambda m: _to_mathml(m.group(1), display="inline", page=name), html_text
    )
    return _ROLE.sub(lambda m: _link_role(m.group(1), html_text), html_text)


def _toc_to_mathml(items: Any, *, page: str) -> None:
    """Turn the ``\\(...\\)`` left in TOC titles into inline MathML, in place."""
    for item in items:
        item.title = _TOC_INLINE.sub(
            lambda m: _to_mathml(m.group(1), display="inline", page=page), item.title
        )
        _toc_to_mathml(item.children, page=page)


def _link_role(target: str, html_text: str) -> str:
    """``<code>target</code>``, linked to its anchor when the page has one."""
    short = target.removeprefix("reparam.")
    for anchor in (f"reparam.{short}", f"reparam.{short.rsplit('.', 1)[-1]}"):
        if f'id="{anchor}"' in html_text:
            return f'<a href="#{anchor}"><code>{short}</code></a>'
    return f"<code>{short}</code>"

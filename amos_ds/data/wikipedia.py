"""Wikipedia `pages-articles` XML dumps: streamed page by page, wikitext reduced to prose.

Kept: the running text of articles (namespace 0), one paragraph per line, link labels and bold/italic text.
Dropped: redirects, templates ({{...}}), tables ({|...|}), references (<ref>), comments, files/images, categories,
interlanguage links, headings, and the trailing reference sections (References, External links, See also, ...).
"""

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import IO

_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
# Tags whose content is not prose; any other tag is removed but its content kept (<b>, <span>, <sup>, ...).
_DROP_BLOCK = re.compile(r"<(math|gallery|timeline|syntaxhighlight|source|pre|score|graph|imagemap|chem|hiero|code)\b"
                         r"[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]")
_BARE_URL = re.compile(r"(?:https?|ftp)://\S+")
_EMPHASIS = re.compile(r"'{2,}")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_LEFTOVER_BRACES = re.compile(r"\{\{|\}\}|\{\||\|\}|\[\[|\]\]")
_SPACES = re.compile(r"[ \t]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
# Link namespaces whose target is not text: files, categories, and any prefix that is not a plain page title.
_NON_TEXT_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|wikipedia|wp|template|help|portal|special|wikt|"
                            r"wiktionary|user|talk|draft|module|[a-z]{2,3}(?:-[a-z]+)?)\s*:", re.IGNORECASE)
_END_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
                 "footnotes", "citations", "notes and references", "works cited"}


def _replace_until_stable(pattern: re.Pattern, repl, text: str) -> str:
    """Apply `pattern` repeatedly so nested constructs ({{a|{{b}}}}) go from the innermost out."""
    while True:
        text, count = pattern.subn(repl, text)
        if not count:
            return text


def _link_text(match: re.Match) -> str:
    target, label = match.group(1), match.group(2)
    if _NON_TEXT_LINK.match(target):
        return ""
    return label if label is not None else target.split("#")[0]


def wikitext_to_text(wikitext: str) -> str:
    """Prose of one article's wikitext, one paragraph per line (empty when nothing readable is left)."""
    text = _COMMENT.sub("", wikitext)
    text = _REF.sub("", text)
    text = _DROP_BLOCK.sub("", text)
    text = _replace_until_stable(_TEMPLATE, "", text)
    text = _replace_until_stable(_TABLE, "", text)
    text = _replace_until_stable(_LINK, _link_text, text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = html.unescape(_TAG.sub("", html.unescape(text)))  # entities may be escaped twice (&amp;nbsp;)
    text = _BARE_URL.sub("", _MAGIC_WORD.sub("", _EMPHASIS.sub("", text)))
    paragraphs = []
    for line in text.split("\n"):
        heading = _HEADING.match(line)
        if heading:
            if heading.group(2).strip().lower() in _END_SECTIONS:
                break
            continue
        line = line.lstrip("*#:;").replace("\xa0", " ")
        if line.startswith(("|", "!", "{", "}")) or _LEFTOVER_BRACES.search(line):
            continue  # residue of malformed tables/templates
        line = _EMPTY_PARENS.sub("", _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", line))).strip()
        if line and any(c.isalpha() for c in line):
            paragraphs.append(line)
    return "\n".join(paragraphs)


def iter_wikipedia_articles(stream: IO[bytes]) -> Iterator[str]:
    """Prose of each article of a `pages-articles` dump, streamed: memory holds one page at a time."""
    root = None
    page: dict[str, str] = {}
    for event, elem in ET.iterparse(stream, events=("start", "end")):
        tag = elem.tag.rsplit("}", 1)[-1]
        if event == "start":
            if root is None:
                root = elem
            continue
        if tag in ("ns", "text"):
            page[tag] = elem.text or ""
        elif tag == "redirect":
            page["redirect"] = ""
        elif tag == "page":
            wikitext = page.get("text", "")
            if page.get("ns") == "0" and "redirect" not in page and not wikitext.lstrip()[:9].upper() == "#REDIRECT":
                article = wikitext_to_text(wikitext)
                if article:
                    yield article
            page = {}
            root.clear()  # drop the finished page from the tree

"""``bikewatch report``: a contact sheet of what was sorted, for a person to glance over.

Thumbnails of the sorted photos grouped by label (mountain, road, unsure),
each captioned with its confidence, least certain first (the photos most
worth a second look), and the rejected files listed with their reasons.
Written as a PNG (Pillow) or as one self-contained HTML file (thumbnails as
``data:`` URIs).

The steps are separate so each can be tested on its own:
:func:`build_sheet` (CSV rows -> groups, pure), :func:`locate_entries` (where
each photo is now, reads the disk), :func:`layout` (groups -> boxes and text
positions, pure), then :func:`draw_png` / :func:`render_html`.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

from bikewatch.clock import parse_timestamp
from bikewatch.files import replacing
from bikewatch.labels import CLASSES, SORTED, Label
from bikewatch.offline.corrections import confidence_of, locate

if TYPE_CHECKING:  # Pillow is imported where a sheet is drawn, not where one is built
    from PIL import Image, ImageDraw, ImageFont

    Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

GROUPS: tuple[str, ...] = SORTED
"""The sheet's sections of thumbnails, in order; rejected files are listed after them."""
REJECTED = Label.REJECTED.value
DEFAULT_LIMIT = 200
MAX_THUMB_PIXELS = 100_000_000

# ----------------------------------------------------------------------------- --since


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m|min|h|d|w)\s*$", re.IGNORECASE)
_UNITS = {"m": "minutes", "min": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``today``, ``yesterday``, ``24h``, ``7d``, ``2w``, ``90m``, or an ISO date/time; pure given ``now``.

    Dates and times without a zone are local time. Returns an aware datetime.
    """
    now = (now or dt.datetime.now()).astimezone()
    word = text.strip().lower()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if word == "today":
        return midnight
    if word == "yesterday":
        return (midnight - dt.timedelta(days=1)).replace(hour=0)
    m = _RELATIVE.match(word)
    if m:
        return now - dt.timedelta(**{_UNITS[m.group(2).lower()]: float(m.group(1))})
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since: cannot read {text!r}; use an ISO date or time (2024-05-01, 2024-05-01T08:00), "
            "a duration back from now (90m, 24h, 7d, 2w), today or yesterday"
        ) from None
    return when.astimezone()  # naive means local time


# ----------------------------------------------------------------------------- the sheet


@dataclass(frozen=True)
class Entry:
    """One sorted photo on the sheet."""

    name: str
    label: str  # as logged
    confidence: float | None
    lean: str  # the class with the higher probability (what an unsure photo leaned to)
    timestamp: str
    destination: Path
    row: Mapping[str, str] = field(compare=False, repr=False)
    found: Path | None = None  # filled by locate_entries
    current: str = ""  # label folder it is in now, when found
    moved: bool = False
    located: bool = False  # True once locate_entries has looked


@dataclass(frozen=True)
class Group:
    label: str
    entries: tuple[Entry, ...]  # shown, least certain first
    total: int

    @property
    def omitted(self) -> int:
        return self.total - len(self.entries)


@dataclass(frozen=True)
class RejectedFile:
    name: str
    reason: str
    timestamp: str
    source: str


@dataclass(frozen=True)
class Sheet:
    groups: tuple[Group, ...]
    rejected: tuple[RejectedFile, ...]  # shown, newest last
    rejected_total: int
    since: dt.datetime | None
    limit: int
    log: str = ""
    generated: str = ""

    @property
    def rejected_omitted(self) -> int:
        return self.rejected_total - len(self.rejected)

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups) + self.rejected_total


def _lean(row: Mapping[str, str], label: str) -> str:
    try:
        pm, pr = float(row.get("p_mountain", "")), float(row.get("p_road", ""))
    except ValueError:
        return label
    return CLASSES[int(pr > pm)]


def build_sheet(
    rows: Iterable[Mapping[str, str]],
    *,
    since: dt.datetime | None = None,
    limit: int = DEFAULT_LIMIT,
    log: str = "",
    generated: str = "",
) -> Sheet:
    """Group CSV rows by label, least certain first, at most ``limit`` per group; pure."""
    by_label: dict[str, list[Entry]] = {g: [] for g in GROUPS}
    rejected: list[RejectedFile] = []
    for row in rows:
        label = row.get("label", "")
        if since is not None:
            when = parse_timestamp(row.get("timestamp", ""))
            if when is None or when < since:
                continue
        dest = row.get("destination", "")
        name = os.path.basename(dest) or os.path.basename(row.get("source", "")) or "?"
        if label == REJECTED:
            rejected.append(RejectedFile(name, row.get("error", "") or "no reason logged",
                                         row.get("timestamp", ""), row.get("source", "")))
        elif label in by_label:
            by_label[label].append(Entry(name, label, confidence_of(row), _lean(row, label),
                                         row.get("timestamp", ""), Path(dest), row))
    groups = []
    for label in GROUPS:
        entries = sorted(by_label[label], key=lambda e: (e.confidence is None, e.confidence or 0.0, e.timestamp))
        groups.append(Group(label, tuple(entries[:limit]), len(entries)))
    return Sheet(tuple(groups), tuple(rejected[:limit]), len(rejected), since, limit, log, generated)


def locate_entries(sheet: Sheet, finder: Callable[[Mapping[str, str]], object] = locate) -> Sheet:
    """Where each photo is now: its destination, a sibling label folder (moved), or nowhere."""

    def one(e: Entry) -> Entry:
        where = finder(e.row)
        return replace(e, found=where.path, current=where.label, moved=where.moved,  # type: ignore[attr-defined]
                       located=True)

    groups = tuple(replace(g, entries=tuple(one(e) for e in g.entries)) for g in sheet.groups)
    return replace(sheet, groups=groups)


# ----------------------------------------------------------------------------- layout

Color = tuple[int, int, int]
HEADER_COLORS: dict[str, Color] = {
    "title": (38, 50, 56),
    Label.MOUNTAIN.value: (46, 125, 50),
    Label.ROAD.value: (21, 101, 192),
    Label.UNSURE.value: (239, 140, 0),
    Label.REJECTED.value: (198, 40, 40),
}
BACKGROUND: Color = (250, 250, 250)
TEXT: Color = (33, 33, 33)
MUTED: Color = (110, 110, 110)
WHITE: Color = (255, 255, 255)
PLACEHOLDER: Color = (224, 224, 224)


def confidence_color(confidence: float | None) -> Color:
    """Red below 0.6, amber below 0.8, else dark green: the eye finds the doubtful ones."""
    if confidence is None or confidence < 0.6:
        return (198, 40, 40)
    if confidence < 0.8:
        return (191, 110, 0)
    return (46, 110, 50)


@dataclass(frozen=True)
class Style:
    columns: int = 8
    thumb: int = 136
    gap: int = 12
    margin: int = 16
    font: int = 12  # Pillow's default font at this size (at its own default of 10, spaces vanish)
    big_font: int = 14  # title and section headers
    line: int = 16  # text line height
    caption_lines: int = 2
    header: int = 30  # section header band height
    title: int = 46


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    def center(self) -> tuple[int, int]:
        return self.x + self.w // 2, self.y + self.h // 2


@dataclass(frozen=True)
class Text:
    x: int
    y: int
    text: str
    color: Color = TEXT
    max_width: int = 0  # 0: no limit; otherwise the drawing shortens it with an ellipsis
    big: bool = False  # title / section header size
    middle: bool = False  # shorten in the middle (file names: the end tells them apart)


@dataclass(frozen=True)
class Band:
    key: str  # "title", a label, or "rejected"
    box: Box
    color: Color


@dataclass(frozen=True)
class Cell:
    entry: Entry
    image: Box  # the thumbnail area (the thumbnail is centred in it)
    captions: tuple[Text, ...]


@dataclass(frozen=True)
class Layout:
    width: int
    height: int
    bands: tuple[Band, ...]
    cells: tuple[Cell, ...]
    texts: tuple[Text, ...]


def fmt_local(when: dt.datetime | None) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M") if when else ""


def caption_for(entry: Entry) -> tuple[str, str]:
    """(confidence line, file name line) under a thumbnail."""
    conf = "?" if entry.confidence is None else f"{entry.confidence:.3f}"
    first = f"{conf} {entry.lean}?" if entry.label == Label.UNSURE else conf
    if entry.moved:
        first += f" -> now {entry.current}/"
    elif entry.located and entry.found is None:
        first += " (missing)"
    return first, entry.name


def group_heading(group: Group) -> str:
    n = group.total
    text = f"{group.label}: {n} photo{'' if n == 1 else 's'}"
    if n:
        text += ", least certain first"
    if group.omitted:
        text += f" (showing {len(group.entries)}; {group.omitted} more left out)"
    return text


def rejected_heading(sheet: Sheet) -> str:
    n = sheet.rejected_total
    text = f"rejected: {n} file{'' if n == 1 else 's'}"
    if sheet.rejected_omitted:
        text += f" (listing {len(sheet.rejected)}; {sheet.rejected_omitted} more left out)"
    return text


def omitted_note(group: Group) -> str:
    n = group.omitted
    return (f"... and {n} more {group.label} photo{'' if n == 1 else 's'} not shown "
            f"(the most certain; raise --limit to see {'it' if n == 1 else 'them'})")


def rejected_note(sheet: Sheet) -> str:
    n = sheet.rejected_omitted
    return f"... and {n} more rejected file{'' if n == 1 else 's'} not listed (raise --limit to list them)"


def title_lines(sheet: Sheet) -> tuple[str, str]:
    since = f"since {fmt_local(sheet.since)}" if sheet.since else "all time"
    counts = ", ".join(f"{g.label} {g.total}" for g in sheet.groups) + f", rejected {sheet.rejected_total}"
    return (f"bikewatch: {sheet.total} files {since}  ({counts})",
            f"log {sheet.log}   generated {sheet.generated}".strip())


def layout(sheet: Sheet, style: Style = Style()) -> Layout:
    """Positions of every band, thumbnail cell and text line; pure."""
    s = style
    width = 2 * s.margin + s.columns * s.thumb + (s.columns - 1) * s.gap
    inner = width - 2 * s.margin
    bands: list[Band] = []
    cells: list[Cell] = []
    texts: list[Text] = []
    y = 0
    title_box = Box(0, 0, width, s.title)
    bands.append(Band("title", title_box, HEADER_COLORS["title"]))
    t1, t2 = title_lines(sheet)
    texts.append(Text(s.margin, 5, t1, WHITE, inner, big=True))
    texts.append(Text(s.margin, 8 + s.line, t2, (200, 200, 200), inner))
    y = s.title + s.margin
    cell_h = s.thumb + 4 + s.caption_lines * s.line
    for group in sheet.groups:
        bands.append(Band(group.label, Box(0, y, width, s.header), HEADER_COLORS[group.label]))
        texts.append(Text(s.margin, y + (s.header - s.big_font) // 2 - 1, group_heading(group), WHITE, inner, big=True))
        y += s.header + s.gap
        if not group.entries:
            texts.append(Text(s.margin, y, "none", MUTED, inner))
            y += s.line + s.margin
            continue
        for i, entry in enumerate(group.entries):
            row, col = divmod(i, s.columns)
            x = s.margin + col * (s.thumb + s.gap)
            top = y + row * (cell_h + s.gap)
            image = Box(x, top, s.thumb, s.thumb)
            first, second = caption_for(entry)
            ty = top + s.thumb + 4
            captions = (Text(x, ty, first, confidence_color(entry.confidence), s.thumb + s.gap // 2),
                        Text(x, ty + s.line, second, TEXT, s.thumb + s.gap // 2, middle=True))
            cells.append(Cell(entry, image, captions))
        rows = -(-len(group.entries) // s.columns)
        y += rows * (cell_h + s.gap)
        if group.omitted:
            texts.append(Text(s.margin, y, omitted_note(group), MUTED, inner))
            y += s.line
        y += s.margin
    bands.append(Band(REJECTED, Box(0, y, width, s.header), HEADER_COLORS[REJECTED]))
    texts.append(Text(s.margin, y + (s.header - s.big_font) // 2 - 1, rejected_heading(sheet), WHITE, inner, big=True))
    y += s.header + s.gap
    if not sheet.rejected:
        texts.append(Text(s.margin, y, "none", MUTED, inner))
        y += s.line
    name_w = min(inner // 3, 260)
    for r in sheet.rejected:
        texts.append(Text(s.margin, y, r.name, TEXT, name_w - 8, middle=True))
        texts.append(Text(s.margin + name_w, y, r.reason, (150, 30, 30), inner - name_w))
        y += s.line
    if sheet.rejected_omitted:
        texts.append(Text(s.margin, y, rejected_note(sheet), MUTED, inner))
        y += s.line
    return Layout(width, y + s.margin, tuple(bands), tuple(cells), tuple(texts))


# ----------------------------------------------------------------------------- thumbnails


def load_thumbnail(path: Path | None, size: int) -> Image.Image | None:
    """A thumbnail fitting ``size`` x ``size``, upright (EXIF), RGB; None when unreadable."""
    from PIL import Image, ImageOps

    from bikewatch.decode.preprocess import to_rgb

    if path is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if im.size[0] * im.size[1] > MAX_THUMB_PIXELS:
                    return None
                if im.format == "JPEG":
                    im.draft("RGB", (size * 2, size * 2))
                im.seek(0)
                im.load()
                upright = ImageOps.exif_transpose(im) or im
                rgb = to_rgb(upright).copy()
    except Exception:  # any unreadable file becomes a placeholder, never a failed report
        return None
    rgb.thumbnail((size, size), Image.Resampling.LANCZOS)
    return rgb


def default_font(size: int) -> Font:
    """Pillow's built-in font (no font files needed) at ``size`` where Pillow can scale it."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def placeholder(size: int, text: str, font_size: int = Style.font) -> Image.Image:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), PLACEHOLDER)
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(170, 170, 170))
    draw.line((0, 0, size - 1, size - 1), fill=(200, 200, 200))
    draw.line((0, size - 1, size - 1, 0), fill=(200, 200, 200))
    font = default_font(font_size)
    w = draw.textlength(text, font=font)
    draw.rectangle(((size - w) / 2 - 3, size / 2 - 9, (size + w) / 2 + 3, size / 2 + 8), fill=PLACEHOLDER)
    draw.text(((size - w) / 2, size / 2 - 7), text, fill=MUTED, font=font)
    return im


def placeholder_text(entry: Entry) -> str:
    return "file not found" if entry.found is None else "cannot read"


def thumbnails(entries: Sequence[Entry], size: int, workers: int | None = None) -> list[Image.Image]:
    """Thumbnails (or placeholders) for ``entries``, decoded in parallel."""
    def one(e: Entry) -> Image.Image:
        return load_thumbnail(e.found, size) or placeholder(size, placeholder_text(e))

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 2)) as pool:
        return list(pool.map(one, entries))


# ----------------------------------------------------------------------------- PNG


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, max_width: int, middle: bool = False) -> str:
    """``text`` shortened with "..." (at the end, or in the middle) to fit ``max_width`` pixels."""
    if not max_width or draw.textlength(text, font=font) <= max_width:
        return text
    if middle:
        head, tail = text[: len(text) // 2], text[len(text) // 2:]
        while head and tail and draw.textlength(head + "..." + tail, font=font) > max_width:
            if len(head) > len(tail):
                head = head[:-1]
            else:
                tail = tail[1:]
        return head + "..." + tail
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."


def draw_png(lay: Layout, images: Sequence[Image.Image] | None = None, style: Style = Style()) -> Image.Image:
    """Draw a layout; ``images`` are the cells' thumbnails in order (loaded when None)."""
    from PIL import Image, ImageDraw

    if images is None:
        images = thumbnails([c.entry for c in lay.cells], style.thumb)
    sheet = Image.new("RGB", (lay.width, lay.height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, big = default_font(style.font), default_font(style.big_font)
    for band in lay.bands:
        b = band.box
        draw.rectangle((b.x, b.y, b.x + b.w - 1, b.y + b.h - 1), fill=band.color)
    for cell, thumb in zip(lay.cells, images):
        b = cell.image
        draw.rectangle((b.x, b.y, b.x + b.w - 1, b.y + b.h - 1), fill=(236, 236, 236))
        sheet.paste(thumb, (b.x + (b.w - thumb.width) // 2, b.y + (b.h - thumb.height) // 2))
        if cell.entry.moved:  # a person already corrected this one: frame it
            draw.rectangle((b.x, b.y, b.x + b.w - 1, b.y + b.h - 1), outline=HEADER_COLORS[cell.entry.current]
                           if cell.entry.current in HEADER_COLORS else MUTED, width=3)
        for t in cell.captions:
            draw.text((t.x, t.y), _fit(draw, t.text, font, t.max_width, t.middle), fill=t.color, font=font)
    for t in lay.texts:
        f = big if t.big else font
        draw.text((t.x, t.y), _fit(draw, t.text, f, t.max_width, t.middle), fill=t.color, font=f)
    return sheet


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;background:#fafafa;color:#212121;margin:0}
header{background:#263238;color:#fff;padding:10px 16px}
header h1{font-size:18px;margin:0 0 4px} header p{margin:0;color:#ccc;font-size:13px}
h2{color:#fff;font-size:15px;margin:16px 0 8px;padding:6px 16px}
h2.mountain{background:#2e7d32} h2.road{background:#1565c0}
h2.unsure{background:#ef8c00} h2.rejected{background:#c62828}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(CELLpx,1fr));gap:12px;padding:0 16px}
figure{margin:0;width:CELLpx}
figure img{width:THUMBpx;height:THUMBpx;object-fit:contain;background:#ececec;display:block}
figure.moved img{outline:3px solid #555}
figcaption{font-size:12px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;width:CELLpx}
.c-low{color:#c62828;font-weight:600} .c-mid{color:#bf6e00;font-weight:600} .c-high{color:#2e6e32}
.note,.none{color:#6e6e6e;padding:4px 16px;font-size:13px}
table{border-collapse:collapse;margin:0 16px;font-size:13px} td,th{padding:2px 12px 2px 0;text-align:left}
td.reason{color:#962020}
"""


def _css(style: Style) -> str:
    return _CSS.replace("THUMBpx", f"{style.thumb}px").replace("CELLpx", f"{style.thumb + style.gap}px")


def _conf_class(c: float | None) -> str:
    return "c-low" if c is None or c < 0.6 else "c-mid" if c < 0.8 else "c-high"


def _data_uri(image: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=82)
        mime = "image/jpeg"
    else:
        image.save(buf, "PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def render_html(sheet: Sheet, images: Sequence[Image.Image] | None = None, style: Style = Style()) -> str:
    """One self-contained HTML page; ``images`` are the shown entries' thumbnails in group order."""
    entries = [e for g in sheet.groups for e in g.entries]
    if images is None:
        images = thumbnails(entries, style.thumb)
    it = iter(images)
    esc = html.escape
    t1, t2 = title_lines(sheet)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(t1)}</title><style>{_css(style)}</style></head><body>",
           f"<header><h1>{esc(t1)}</h1><p>{esc(t2)}</p></header>"]
    for group in sheet.groups:
        out.append(f'<section id="{group.label}"><h2 class="{group.label}">{esc(group_heading(group))}</h2>')
        if not group.entries:
            out.append('<p class="none">none</p></section>')
            continue
        out.append('<div class="grid">')
        for entry in group.entries:
            image = next(it)
            first, second = caption_for(entry)
            fmt = "JPEG" if entry.found is not None and image.mode == "RGB" else "PNG"
            where = str(entry.found or entry.destination)
            cls = ' class="moved"' if entry.moved else ""
            out.append(
                f'<figure{cls}><img src="{_data_uri(image, fmt)}" alt="{esc(entry.name)}" title="{esc(where)}">'
                f'<figcaption><span class="{_conf_class(entry.confidence)}">{esc(first)}</span><br>'
                f'{esc(second)}</figcaption></figure>'
            )
        out.append("</div>")
        if group.omitted:
            out.append(f'<p class="note">{esc(omitted_note(group))}</p>')
        out.append("</section>")
    out.append(f'<section id="rejected"><h2 class="rejected">{esc(rejected_heading(sheet))}</h2>')
    if sheet.rejected:
        out.append("<table><tr><th>file</th><th>reason</th><th>time</th></tr>")
        for r in sheet.rejected:
            when = parse_timestamp(r.timestamp)
            out.append(f'<tr><td title="{esc(r.source)}">{esc(r.name)}</td><td class="reason">{esc(r.reason)}</td>'
                       f"<td>{esc(fmt_local(when))}</td></tr>")
        out.append("</table>")
    else:
        out.append('<p class="none">none</p>')
    if sheet.rejected_omitted:
        out.append(f'<p class="note">{esc(rejected_note(sheet))}</p>')
    out.append("</section></body></html>\n")
    return "\n".join(out)


# ----------------------------------------------------------------------------- the command


def write_report(
    rows: Iterable[Mapping[str, str]],
    out: Path,
    *,
    since: dt.datetime | None = None,
    limit: int = DEFAULT_LIMIT,
    log: str = "",
    style: Style = Style(),
) -> Sheet:
    """Build, locate, draw and write ``out`` (.png or .html) atomically; returns the sheet."""
    kind = out.suffix.lower()
    if kind not in (".png", ".html", ".htm"):
        raise ValueError(f"--out must end in .png or .html (got {out})")
    generated = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    sheet = locate_entries(build_sheet(rows, since=since, limit=limit, log=log, generated=generated))
    with replacing(out) as tmp:  # a browser reloading the sheet sees the old one or the new one, whole
        if kind == ".png":
            draw_png(layout(sheet, style), style=style).save(tmp, "PNG", optimize=False)
        else:
            tmp.write_text(render_html(sheet, style=style), encoding="utf-8")
    return sheet

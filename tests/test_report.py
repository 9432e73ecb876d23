"""``bikewatch report``: contact sheet of sorted photos (PNG and HTML), from real files and a real CSV log."""

from __future__ import annotations

import datetime as dt
import hashlib
import html as htmllib
import re
from pathlib import Path

import pytest
from PIL import Image

import imagefactory
from bikewatch.cli import main
from bikewatch.store.ledger import Ledger, Row, read_rows
from bikewatch.offline.report import (
    HEADER_COLORS, PLACEHOLDER, Style, build_sheet, caption_for, layout, locate_entries, parse_since, render_html,
    write_report,
)

UTC = dt.timezone.utc
NOW = dt.datetime(2024, 5, 2, 12, 0, tzinfo=UTC)


def _ts(when: dt.datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds")


def make_run(output: Path, specs: list[dict], log: Path | None = None) -> Path:
    """Real photo files under OUTPUT/<label>/ and the CSV rows the daemon would have written for them.

    Each spec: name, label, p_mountain (None for rejected), color, error, when.
    """
    log = log or output / "classifications.csv"
    rows = []
    for i, spec in enumerate(specs):
        label, name = spec["label"], spec["name"]
        dest = output / label / name
        if label == "rejected":
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(b"this is not a picture")
        else:
            imagefactory.png(dest, color=spec.get("color", imagefactory.RED))
        data = dest.read_bytes()
        pm = spec.get("p_mountain")
        conf = "" if pm is None else f"{max(pm, 1 - pm):.6f}"
        rows.append(Row(
            timestamp=_ts(spec.get("when", NOW)), source=f"/srv/inbox/{name}", destination=str(dest), label=label,
            confidence=conf, p_mountain="" if pm is None else f"{pm:.6f}",
            p_road="" if pm is None else f"{1 - pm:.6f}", sha256=hashlib.sha256(data).hexdigest(), model="bikes@test",
            error=spec.get("error", ""), size_bytes=str(len(data)), id=f"batch.{i:04d}", worker="test",
        ))
    Ledger(log).append(rows)
    return log


COLORS = [(200, 30, 30), (30, 160, 60), (30, 60, 200), (220, 180, 20), (140, 40, 160), (20, 170, 170),
          (240, 120, 40), (90, 90, 90)]


def standard_specs() -> list[dict]:
    return [
        {"name": "m1.png", "label": "mountain", "p_mountain": 0.97, "color": COLORS[0]},
        {"name": "m2.png", "label": "mountain", "p_mountain": 0.61, "color": COLORS[1]},
        {"name": "m3.png", "label": "mountain", "p_mountain": 0.83, "color": COLORS[2]},
        {"name": "r1.png", "label": "road", "p_mountain": 0.10, "color": COLORS[3]},
        {"name": "r2.png", "label": "road", "p_mountain": 0.45, "color": COLORS[4]},
        {"name": "u1.png", "label": "unsure", "p_mountain": 0.55, "color": COLORS[5]},
        {"name": "bad.jpg", "label": "rejected", "error": "not an image (unrecognised format)"},
        {"name": "cut.jpg", "label": "rejected", "error": "truncated image: image file is truncated <&>"},
    ]


# ----------------------------------------------------------------------------- --since


def test_since_accepts_relative_words_and_iso() -> None:
    now = dt.datetime(2024, 5, 2, 15, 30, tzinfo=UTC)
    assert parse_since("24h", now) == now - dt.timedelta(hours=24)
    assert parse_since("7d", now) == now - dt.timedelta(days=7)
    assert parse_since("90m", now) == now - dt.timedelta(minutes=90)
    assert parse_since("2w", now) == now - dt.timedelta(weeks=2)
    today = parse_since("today", now)
    assert (today.hour, today.minute, today.second) == (0, 0, 0) and today <= now
    assert parse_since("yesterday", now) == today - dt.timedelta(days=1)
    assert parse_since("2024-05-01T08:00:00+00:00", now) == dt.datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert parse_since("2024-05-01T08:00Z", now) == dt.datetime(2024, 5, 1, 8, tzinfo=UTC)
    local = parse_since("2024-05-01", now)  # no zone: local midnight
    assert local.tzinfo is not None and (local.year, local.month, local.day, local.hour) == (2024, 5, 1, 0)
    with pytest.raises(ValueError, match="--since"):
        parse_since("last tuesday", now)


# ----------------------------------------------------------------------------- pure parts


def test_sheet_groups_by_label_least_certain_first_and_lists_rejected(tmp_path: Path) -> None:
    log = make_run(tmp_path / "out", standard_specs())
    sheet = build_sheet(read_rows(log))
    by = {g.label: g for g in sheet.groups}
    assert [g.label for g in sheet.groups] == ["mountain", "road", "unsure"]
    assert [e.name for e in by["mountain"].entries] == ["m2.png", "m3.png", "m1.png"]
    assert [e.name for e in by["road"].entries] == ["r2.png", "r1.png"]
    assert by["unsure"].entries[0].lean == "mountain"
    assert caption_for(by["unsure"].entries[0])[0] == "0.550 mountain?"
    assert [(r.name, r.reason) for r in sheet.rejected] == [
        ("bad.jpg", "not an image (unrecognised format)"),
        ("cut.jpg", "truncated image: image file is truncated <&>"),
    ]
    assert sheet.total == 8


def test_limit_keeps_the_least_certain_and_counts_the_rest(tmp_path: Path) -> None:
    log = make_run(tmp_path / "out", standard_specs())
    sheet = build_sheet(read_rows(log), limit=1)
    by = {g.label: g for g in sheet.groups}
    assert [e.name for e in by["mountain"].entries] == ["m2.png"] and by["mountain"].omitted == 2
    assert by["road"].omitted == 1 and by["unsure"].omitted == 0
    assert sheet.rejected_omitted == 1


def test_since_filters_rows_by_timestamp(tmp_path: Path) -> None:
    specs = standard_specs()
    specs[0]["when"] = NOW - dt.timedelta(days=3)
    specs[6]["when"] = NOW - dt.timedelta(days=3)
    log = make_run(tmp_path / "out", specs)
    sheet = build_sheet(read_rows(log), since=parse_since("24h", NOW))
    names = [e.name for g in sheet.groups for e in g.entries]
    assert "m1.png" not in names and len(names) == 5
    assert [r.name for r in sheet.rejected] == ["cut.jpg"]


def test_layout_has_one_cell_per_sorted_photo_and_a_band_per_section(tmp_path: Path) -> None:
    log = make_run(tmp_path / "out", standard_specs())
    style = Style(columns=4)
    lay = layout(build_sheet(read_rows(log)), style)
    assert len(lay.cells) == 6
    assert [b.key for b in lay.bands] == ["title", "mountain", "road", "unsure", "rejected"]
    assert lay.width == 2 * style.margin + 4 * style.thumb + 3 * style.gap
    ys = [b.box.y for b in lay.bands]
    assert ys == sorted(ys) and lay.height > ys[-1] + style.header
    for cell in lay.cells:  # inside the sheet, no overlaps with bands
        assert 0 <= cell.image.x and cell.image.x + cell.image.w <= lay.width
        for band in lay.bands:
            assert cell.image.y >= band.box.y + band.box.h or cell.image.y + cell.image.h <= band.box.y


# ----------------------------------------------------------------------------- PNG


def _near(a: tuple[int, ...], b: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_png_sheet_draws_each_thumbnail_header_and_placeholder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    log = make_run(out, standard_specs())
    (out / "road" / "r2.png").rename(out / "mountain" / "r2.png")  # a person corrected it
    (out / "mountain" / "m3.png").unlink()  # and deleted another one
    style = Style(columns=4)
    sheet_png = tmp_path / "sheet.png"
    write_report(read_rows(log), sheet_png, style=style)

    lay = layout(locate_entries(build_sheet(read_rows(log))), style)
    with Image.open(sheet_png) as im:
        assert im.format == "PNG"
        assert im.size == (lay.width, lay.height)
        px = im.convert("RGB").load()
    for band in lay.bands:  # section headers: a band of the section's colour
        for x in (2, lay.width // 2, lay.width - 3):
            assert px[x, band.box.y + 2] == HEADER_COLORS[band.key], band.key
    colors = {s["name"]: s.get("color") for s in standard_specs()}
    drawn = 0
    for cell in lay.cells:
        cx, cy = cell.image.center()
        if cell.entry.name == "m3.png":  # missing: the placeholder
            assert px[cell.image.x + cell.image.w // 4, cell.image.y + cell.image.h // 2 - 20] == PLACEHOLDER
            assert cell.entry.found is None
            continue
        assert _near(px[cx, cy], colors[cell.entry.name]), (cell.entry.name, px[cx, cy])
        drawn += 1
    assert drawn == 5
    moved = next(c for c in lay.cells if c.entry.name == "r2.png")
    assert moved.entry.moved and moved.entry.current == "mountain"
    assert px[moved.image.x + 1, moved.image.y + 1] == HEADER_COLORS["mountain"]  # framed in its new colour
    assert "now mountain/" in caption_for(moved.entry)[0]


def test_png_via_cli_with_config_since_and_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    make_run(out, standard_specs())
    config = tmp_path / "bw.toml"
    config.write_text(f'inbox = "{tmp_path / "inbox"}"\noutput = "{out}"\n')
    sheet = tmp_path / "sheet.png"
    assert main(["report", "--config", str(config), "--since", "2024-05-01", "--limit", "1", "--out", str(sheet)]) == 0
    said = capsys.readouterr().out
    assert "3 thumbnails" in said and "3 thumbnails left out by --limit 1" in said
    with Image.open(sheet) as im:
        im.verify()
    assert not list(tmp_path.glob(".sheet.png*"))  # the temporary file was renamed into place


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = make_run(tmp_path / "out", standard_specs())
    assert main(["report", "--log", str(log), "--out", str(tmp_path / "sheet.pdf")]) == 2
    assert main(["report", "--log", str(log), "--since", "soon", "--out", str(tmp_path / "s.png")]) == 2
    assert main(["report", "--log", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert ".png or .html" in err and "--since" in err and "not found" in err
    with pytest.raises(SystemExit):
        main(["report", "--log", str(log), "--config", "x.toml", "--out", "s.png"])  # one or the other


# ----------------------------------------------------------------------------- HTML


def test_html_is_self_contained_one_img_per_photo_and_reasons(tmp_path: Path) -> None:
    out = tmp_path / "out"
    log = make_run(out, standard_specs())
    (out / "mountain" / "m1.png").unlink()
    page = tmp_path / "sheet.html"
    assert main(["report", "--log", str(log), "--out", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    imgs = re.findall(r"<img\b[^>]*>", text)
    assert len(imgs) == 6  # one per sorted photo, a placeholder image for the missing one
    srcs = [re.search(r'src="([^"]*)"', tag).group(1) for tag in imgs]  # type: ignore[union-attr]
    assert all(s.startswith(("data:image/jpeg;base64,", "data:image/png;base64,")) for s in srcs)
    assert "http" not in "".join(srcs) and "<link" not in text and "<script" not in text
    for name in ("m1.png", "m2.png", "m3.png", "r1.png", "r2.png", "u1.png"):
        assert f'alt="{name}"' in text
    assert "not an image (unrecognised format)" in text
    assert htmllib.escape("truncated image: image file is truncated <&>") in text
    assert "1.000 (missing)" not in text and "0.970 (missing)" in text
    for label in ("mountain", "road", "unsure", "rejected"):
        assert f'<section id="{label}">' in text


def test_html_says_how_many_were_left_out(tmp_path: Path) -> None:
    log = make_run(tmp_path / "out", standard_specs())
    sheet = locate_entries(build_sheet(read_rows(log), limit=2))
    text = render_html(sheet)
    assert len(re.findall(r"<img\b", text)) == 5  # 2 mountain, 2 road, 1 unsure
    assert "1 more mountain photo not shown" in text
    assert "1 more rejected file not listed" not in text  # limit 2 lists both


def test_a_sheet_that_cannot_be_written_leaves_no_temporary_file(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    log = make_run(tmp_path / "out", standard_specs())
    sheets = tmp_path / "sheets"
    (sheets / "today.html").mkdir(parents=True)  # a folder where the sheet should go: the rename fails
    (sheets / "today.html" / "keep.txt").write_text("mine")
    assert main(["report", "--log", str(log), "--out", str(sheets / "today.html")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in sheets.iterdir()) == ["today.html"]  # no .today.html.tmp-* left beside it
    assert (sheets / "today.html" / "keep.txt").read_text() == "mine"
    assert main(["report", "--log", str(log), "--out", str(sheets / "yesterday.html")]) == 0
    assert sorted(p.name for p in sheets.iterdir()) == ["today.html", "yesterday.html"]

"""bikewatch.service.metrics: Prometheus exposition written as a textfile and served over HTTP."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bikewatch.service.metrics import Metrics, reason_label


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def exercised() -> Metrics:
    m = Metrics()
    for label in ("mountain", "mountain", "road", "unsure"):
        m.count(label)
    m.count("rejected", "truncated image: image file is truncated (65 bytes not processed)")
    m.count("rejected", "truncated image: image file is truncated (1234 bytes not processed)")
    m.count("rejected", "file too large (600000000 bytes)")
    m.observe_batch(3, 0.04)
    m.observe_batch(32, 0.8)
    m.set_backlog(17)
    m.set_model("bikes@06d8442773a2")
    m.set_model("fixed@5f869102ad7e")  # a model switch replaces the series
    m.set_blocked(True)
    return m


def test_textfile_is_valid_exposition_with_every_metric(tmp_path: Path) -> None:
    path = tmp_path / "textfile" / "bikewatch.prom"
    exercised().write_textfile(path)
    text = path.read_text()
    fams = families(text)
    types = {name: fam.type for name, fam in fams.items()}  # type: ignore[attr-defined]
    assert types["bikewatch_photos"] == "counter" and types["bikewatch_rejected"] == "counter"
    assert types["bikewatch_batch_size"] == "histogram" and types["bikewatch_batch_seconds"] == "histogram"
    assert types["bikewatch_inbox_backlog"] == "gauge" and types["bikewatch_output_blocked"] == "gauge"
    assert types["bikewatch_model_info"] == "gauge"  # the text format has no info type
    got = samples(text)
    assert got[("bikewatch_photos_total", (("label", "mountain"),))] == 2
    assert got[("bikewatch_photos_total", (("label", "road"),))] == 1
    assert got[("bikewatch_photos_total", (("label", "rejected"),))] == 3
    assert got[("bikewatch_rejected_total", (("reason", "truncated image"),))] == 2  # one series for both texts
    assert got[("bikewatch_rejected_total", (("reason", "file too large"),))] == 1
    assert got[("bikewatch_batch_size_count", ())] == 2 and got[("bikewatch_batch_size_sum", ())] == 35
    assert got[("bikewatch_batch_size_bucket", (("le", "4.0"),))] == 1
    assert got[("bikewatch_batch_seconds_bucket", (("le", "0.05"),))] == 1
    assert got[("bikewatch_batch_seconds_bucket", (("le", "+Inf"),))] == 2
    assert got[("bikewatch_inbox_backlog", ())] == 17
    assert got[("bikewatch_output_blocked", ())] == 1
    models = [k for k in got if k[0] == "bikewatch_model_info"]
    assert models == [("bikewatch_model_info", (("model", "fixed@5f869102ad7e"),))]
    assert [p.name for p in path.parent.iterdir()] == ["bikewatch.prom"]  # no temporary left behind


def test_fresh_metrics_show_zero_counters_and_registries_do_not_collide(tmp_path: Path) -> None:
    a, b = Metrics(), Metrics()  # each its own registry: no "Duplicated timeseries" error
    a.count("road")
    a.write_textfile(tmp_path / "a.prom")
    b.write_textfile(tmp_path / "b.prom")
    got = samples((tmp_path / "b.prom").read_text())
    assert all(got[("bikewatch_photos_total", (("label", label),))] == 0
               for label in ("mountain", "road", "unsure", "rejected"))
    assert samples((tmp_path / "a.prom").read_text())[("bikewatch_photos_total", (("label", "road"),))] == 1
    b.set_blocked(False)
    b.write_textfile(tmp_path / "b.prom")  # rewriting replaces the file
    assert samples((tmp_path / "b.prom").read_text())[("bikewatch_output_blocked", ())] == 0


def test_reason_labels_stay_low_cardinality() -> None:
    assert reason_label("not an image (unrecognised format)") == "not an image"
    assert reason_label("cannot open file: Permission denied") == "cannot open file"
    assert reason_label("invalid image size 0x0") == "invalid image size"
    too_big = "too large to decode safely: 50000x50000 pixels exceeds the limit"
    assert reason_label(too_big) == "too large to decode safely"
    assert reason_label("") == "unknown"
    assert len(reason_label("x" * 200)) == 40


def test_serves_metrics_over_http_on_loopback() -> None:
    m = exercised()
    server = m.serve(0)
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    finally:
        m.close()
    assert samples(text)[("bikewatch_inbox_backlog", ())] == 17
    assert server.server_address[0] == "127.0.0.1"


def test_read_ahead_counters_follow_the_running_totals() -> None:
    m = Metrics()
    value = m.registry.get_sample_value
    assert value("bikewatch_read_ahead_total", {"outcome": "used"}) == 0
    m.read_ahead_totals(used=3, discarded=1)
    m.read_ahead_totals(used=5, discarded=1)
    assert value("bikewatch_read_ahead_total", {"outcome": "used"}) == 5
    assert value("bikewatch_read_ahead_total", {"outcome": "discarded"}) == 1

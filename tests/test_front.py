import csv

from compressor.front import pareto_mask, write_front


def _points():
    return [
        {"speedup_requested": 0.25, "latency_ms": 2.6, "loss": 0.9, "choices": ["a", "b"]},
        {"speedup_requested": 0.5, "latency_ms": 5.1, "loss": 0.5, "choices": ["t", "b"]},
        {"speedup_requested": 0.75, "latency_ms": 7.4, "loss": 0.6, "choices": ["t", "t"]},
    ]


def test_write_front_files(tmp_path):
    out = tmp_path / "run"
    paths = write_front(_points(), {"latency_ms": 10.0, "loss": 0.4}, out)
    assert set(paths) == {"png", "csv", "md"}
    assert paths["png"].name == "search_front.png"  # front.png is held-out top-1 (plots)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["speedup_requested"] for r in rows] == ["teacher", "0.25", "0.5", "0.75"]
    assert rows[1]["choices"] == "a;b"
    assert [r["pareto"] for r in rows[1:]] == ["True", "True", "False"]  # 0.75 dominated by 0.5
    assert float(rows[2]["speedup"]) == 0.51
    assert "| 0.5 | 5.1 | 0.51 | 0.5 | yes |" in paths["md"].read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_write_front_tolerates_a_failed_budget(tmp_path):
    pts = _points() + [{"speedup_requested": 0.1, "latency_ms": None, "loss": None,
                        "choices": None}]
    paths = write_front(pts, {"latency_ms": 10.0, "loss": 0.4}, tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 5 and rows[-1]["latency_ms"] == ""


def test_pareto_mask():
    assert pareto_mask([(1, 2), (2, 1), (2, 2), (float("nan"), 0)]) == [True, True, False, False]

"""Annotation readers on fixtures in the published formats (and on the real files when present)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvr.data.annotations import AnnotationError, LocalSource, Manifest, read_manifest

FIX = Path(__file__).parents[1] / "fixtures" / "annotations"
REAL_MSRVTT = Path(__file__).parents[3] / "shared" / "datasets" / "msrvtt"


def _by_video(m: Manifest) -> dict[str, list[str]]:
    return {m.video_ids[i]: [m.captions[j] for j in js] for i, js in enumerate(m.captions_per_video())}


def test_msrvtt_train_reads_the_9k_csv_and_the_json_captions():
    m = read_manifest(FIX / "msrvtt", "msrvtt", "train")
    # video3's only caption is not UTF-8 -> video3 dropped; video1's empty caption dropped.
    assert m.video_ids == ["video0", "video1", "video2"]
    assert m.video_files == ["video0.mp4", "video1.mp4", "video2.mp4"]
    assert m.captions == ["a car is shown", "a red car drives down a road",
                          "a woman is cooking in a kitchen", "a man talks about cars"]
    assert m.caption_video == [0, 0, 1, 2]
    assert m.max_captions == 2 and m.num_captions == 4
    reasons = sorted((r["uri"].split("#")[1], r["reason"]) for r in m.quarantine)
    assert reasons == [("video1", "empty caption"), ("video3", "caption is not valid UTF-8"),
                       ("video3", "video has no usable caption; dropped")]
    assert read_manifest(FIX / "msrvtt", "msrvtt", "train.9k").video_ids == m.video_ids


def test_msrvtt_other_splits():
    src = LocalSource(FIX / "msrvtt")
    assert read_manifest(src, "msrvtt", "train.7k").video_ids == ["video0", "video2"]
    assert read_manifest(src, "msrvtt", "val").video_ids == ["video2"]
    test = read_manifest(src, "msrvtt", "test")
    assert test.video_ids == ["video9770", "video9771", "video7020"]
    by = _by_video(test)
    # The JSFusion sentence first, then the JSON's other captions of that video.
    assert by["video9771"] == ["a little girl does gymnastics", "a girl flips on a mat"]
    assert by["video9770"] == ["a person is connecting something to system"]
    assert by["video7020"] == ["a woman creating a fondant baby and flower"]
    caps, vids = test.first_captions()
    assert caps == ["a person is connecting something to system", "a little girl does gymnastics",
                    "a woman creating a fondant baby and flower"] and vids == [0, 1, 2]
    full = read_manifest(src, "msrvtt", "test.full")
    assert full.video_ids == ["video9770", "video9771"]      # video7020 has no JSON caption -> dropped


def test_msrvtt_errors_name_the_file_and_split(tmp_path):
    with pytest.raises(AnnotationError, match="not an MSR-VTT split"):
        read_manifest(FIX / "msrvtt", "msrvtt", "training")
    with pytest.raises(AnnotationError, match="MSRVTT_data.json: annotation file not found"):
        read_manifest(tmp_path, "msrvtt", "train")
    (tmp_path / "MSRVTT_data.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="MSRVTT_data.json: not valid JSON"):
        read_manifest(tmp_path, "msrvtt", "train")
    (tmp_path / "MSRVTT_data.json").write_text('{"videos": [], "sentences": []}')
    (tmp_path / "MSRVTT_train.9k.csv").write_text("vid\nvideo0\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_train.9k.csv: missing column\(s\) \['video_id'\]"):
        read_manifest(tmp_path, "msrvtt", "train")
    with pytest.raises(AnnotationError, match="no reader"):
        read_manifest(tmp_path, "kinetics", "train")


def test_manifest_checks_its_invariants_and_head():
    with pytest.raises(ValueError, match="index outside"):
        Manifest(dataset="x", split="s", video_ids=["a"], video_files=["a.mp4"], captions=["c"], caption_video=[1])
    m = read_manifest(FIX / "msrvtt", "msrvtt", "train").head(2)
    assert m.video_ids == ["video0", "video1"] and m.caption_video == [0, 0, 1]


@pytest.mark.skipif(not (REAL_MSRVTT / "MSRVTT_JSFUSION_test.csv").exists(),
                    reason="the real MSR-VTT annotation files (../shared/datasets/msrvtt) are not on this machine")
def test_real_msrvtt_release_files():
    test = read_manifest(REAL_MSRVTT, "msrvtt", "test")
    assert test.num_videos == 1000 and test.num_captions == 1000 and not test.quarantine
    assert test.video_ids[:2] == ["video9770", "video9771"]
    assert test.captions[2] == "a woman creating a fondant baby and flower"
    # The training captions live in MSRVTT_data.json, which this folder does not have: a clear error.
    if not (REAL_MSRVTT / "MSRVTT_data.json").exists():
        with pytest.raises(AnnotationError, match="MSRVTT_data.json"):
            read_manifest(REAL_MSRVTT, "msrvtt", "train.9k")
    import csv

    for name, n in (("MSRVTT_train.9k.csv", 9000), ("MSRVTT_train.7k.csv", 7010)):
        rows = list(csv.DictReader((REAL_MSRVTT / name).open()))
        assert len(rows) == n

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


# -- the other published formats ------------------------------------------------------------------

def test_msvd_reads_the_split_list_and_the_token_pickle(tmp_path):
    m = read_manifest(FIX / "msvd", "msvd", "train")
    assert m.video_ids == ["-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208"]
    assert m.video_files == ["-4wsuPCjDBc_5_15.avi", "-7KMZQEsJW4_205_208.avi"]
    assert _by_video(m) == {"-4wsuPCjDBc_5_15": ["a squirrel is eating a peanut", "a chipmunk eats"],
                            "-7KMZQEsJW4_205_208": ["a woman is slicing an onion"]}
    assert [r["reason"] for r in m.quarantine] == ["empty caption"]
    test = read_manifest(FIX / "msvd", "msvd", "test")
    assert test.video_ids == ["-8y1Q0rA3n8_108_115"]                     # 00jrXRMlZOY_0_10: no caption
    assert any("00jrXRMlZOY_0_10" in r["uri"] and "no usable caption" in r["reason"] for r in test.quarantine)
    # a pickle that would import / call something is refused, never executed
    import pickle

    (tmp_path / "train_list.txt").write_text("a\n")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"a": [Path("x")]}))
    with pytest.raises(AnnotationError, match=r"raw-captions.pkl: not a pickle of plain captions"):
        read_manifest(tmp_path, "msvd", "train")
    with pytest.raises(AnnotationError, match="not a MSVD split"):
        read_manifest(FIX / "msvd", "msvd", "val_2")


def test_didemo_joins_descriptions_into_one_paragraph_per_video():
    m = read_manifest(FIX / "didemo", "didemo", "test")
    v1, v2 = "12090392@N02_13482799053_87ef417396.mov", "10015567@N08_3655084291_d8b2d2e5b2.mp4"
    assert m.video_ids == [v1, v2] and m.video_files == [v1, v2]
    assert m.captions == ["a girl in a red shirt walks away the girl comes back", "camera pans to the right"]
    assert m.caption_video == [0, 1] and m.segments == [(0.0, 30.0), (0.0, 30.0)]
    reasons = sorted(r["reason"] for r in m.quarantine)                   # v3: blank description
    assert reasons == ["empty caption", "video has no usable caption; dropped"]
    train = read_manifest(FIX / "didemo", "didemo", "train")              # no list file: the JSON's videos
    assert train.video_ids == [v1, v2] and train.captions[0] == "a girl in a red shirt walks away"


def test_lsmdc_reads_the_tab_separated_release_files():
    m = read_manifest(FIX / "lsmdc", "lsmdc", "train")
    clip = "0001_American_Beauty_00.00.51.926-00.00.54.129"
    assert m.video_ids == [clip, "3001_21_JUMP_STREET_00.00.14.370-00.00.16.240"]
    assert m.video_files[0] == f"0001_American_Beauty/{clip}.avi"
    assert _by_video(m)[clip] == ["SOMEONE walks into the kitchen.", "He opens the fridge."]
    assert read_manifest(FIX / "lsmdc", "lsmdc", "test").num_videos == 1
    with pytest.raises(AnnotationError, match=r"LSMDC16_annos_val.csv: line 1 has 5 tab-separated field\(s\)"):
        read_manifest(FIX / "lsmdc", "lsmdc", "val")


def test_lsmdc_non_utf8_sentence_is_quarantined(tmp_path):
    good = (FIX / "lsmdc" / "LSMDC16_annos_training.csv").read_bytes()
    bad = b"9999_X_00.00.01.000-00.00.02.000\ta\tb\tc\td\tcaf\xe9 \xff\n"
    (tmp_path / "LSMDC16_annos_training.csv").write_bytes(good + bad)
    m = read_manifest(tmp_path, "lsmdc", "train")
    assert m.num_videos == 2
    assert ("LSMDC16_annos_training.csv#9999_X_00.00.01.000-00.00.02.000", "caption is not valid UTF-8") in \
        {(r["uri"], r["reason"]) for r in m.quarantine}


def test_charades_script_first_then_descriptions():
    m = read_manifest(FIX / "charades", "charades", "train")
    assert m.video_ids == ["46GP8", "N11GT"] and m.video_files == ["46GP8.mp4", "N11GT.mp4"]
    assert _by_video(m)["46GP8"] == ["A person cooks food on a stove before looking out a window.",
                                     "A person cooks food on the stove.", "They then look out of the window."]
    assert _by_video(m)["N11GT"] == ["One person opens a closet door."]
    caps, _ = m.first_captions()
    assert caps[0].startswith("A person cooks food on a stove before")
    assert read_manifest(FIX / "charades", "charades", "test").video_ids == ["YSKX3"]
    with pytest.raises(AnnotationError, match="not a Charades split"):
        read_manifest(FIX / "charades", "charades", "val")


def test_vatex_release_json_and_retrieval_split_lists():
    train = read_manifest(FIX / "vatex", "vatex", "train")
    assert train.video_ids == ["Ptf_2VRj-V0_000122_000132", "Bnrk8P2n-1Q_000010_000020"]
    assert train.video_files[0] == "Ptf_2VRj-V0_000122_000132.mp4"
    assert _by_video(train)["Ptf_2VRj-V0_000122_000132"] == ["A man is playing the drums.",
                                                              "Someone hits drums with sticks."]
    # test_list.txt present: its ids, in its order, captions found in the validation release
    test = read_manifest(FIX / "vatex", "vatex", "test")
    assert test.video_ids == ["xyzXYZ98765_000030_000040", "abcDEF12345_000001_000011"]
    assert _by_video(test)["abcDEF12345_000001_000011"] == ["A girl rides a bike.", "A child is cycling."]
    assert read_manifest(FIX / "vatex", "vatex", "val").num_videos == 2


def test_activitynet_paragraphs_and_id_lists():
    m = read_manifest(FIX / "activitynet", "activitynet", "train")
    assert m.video_ids == ["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8"]
    assert m.video_files == ["QOlSCBRmfWY.mp4", "ehGHCYKzyZ8.mp4"]
    assert m.captions[0] == "A young woman is seen standing in a room. She then begins to dance. She ends by bowing."
    assert m.caption_video == [0, 1] and m.segments is None
    val = read_manifest(FIX / "activitynet", "activitynet", "val")
    assert val.video_ids == ["v_uqiMw7tQ1Cc"]
    assert {r["reason"] for r in val.quarantine} == {"empty caption", "video has no usable caption; dropped"}


@pytest.mark.parametrize(("fmt", "split", "file", "content", "match"), [
    ("didemo", "train", "train_data.json", '[{"video": "a.mp4"}]', r"train_data.json: a record lacks the field 'description'"),
    ("didemo", "train", "train_data.json", '{"video": "a.mp4"}', r"train_data.json: expected a JSON list"),
    ("vatex", "train", "vatex_training_v1.0.json", '[{"videoID": "x"}]', r"vatex_training_v1.0.json: .*'enCap'"),
    ("vatex", "train", "vatex_training_v1.0.json", '[{"enCap": ["a"]}]', r"vatex_training_v1.0.json: .*'videoID'"),
    ("activitynet", "train", "train.json", '{"v_a": {"duration": 3}}', r"train.json: .*'sentences'"),
    ("activitynet", "train", "train.json", '[1, 2]', r"train.json: expected a JSON object"),
    ("charades", "train", "Charades_v1_train.csv", "id,script\nA,b\n", r"Charades_v1_train.csv: missing column\(s\) \['descriptions'\]"),
    ("msvd", "train", "train_list.txt", "a\n", r"raw-captions.pkl: annotation file not found"),
    ("lsmdc", "test", "other.csv", "", r"LSMDC16_challenge_1000_publictect.csv: annotation file not found"),
])
def test_malformed_files_name_the_file_and_the_field(tmp_path, fmt, split, file, content, match):
    (tmp_path / file).write_text(content)
    with pytest.raises(AnnotationError, match=match):
        read_manifest(tmp_path, fmt, split)

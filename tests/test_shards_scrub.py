"""--scrub-reports: the manifest's own identifiers and typed identifiers (dates, phones, national ids,
e-mails, long digit runs) leave English and Chinese reports; clinical sentences come through unchanged."""

import csv
import json
import re
import tarfile
import unicodedata

import pytest
from conftest import build_argv

from retclip_dist import synth
from retclip_dist.shards import cli
from retclip_dist.shards.scrub import scrub_text

# (report, identifiers of its row, strings that must be gone, placeholders that must be there)
REPORTS = [
    (
        "Name: HANS MÜLLER  MRN: 77120934  DOB: 1957-03-04. Mr Müller was seen on 4 March 2023 and on "
        "March 18, 2023. Call +49 30 1234 5678 or hans.mueller@example.de. Patient ID: HOSP.0091427.",
        [("patient_id", "HOSP.0091427"), ("name", "Hans Müller"), ("mrn", "77120934")],
        [
            "Müller",
            "MÜLLER",
            "77120934",
            "1957",
            "0091427",
            "1234 5678",
            "hans.mueller",
            "4 March 2023",
            "18, 2023",
        ],
        ["[NAME]", "[MRN]", "[DATE]", "[PHONE]", "[EMAIL]", "[PATIENT_ID]"],
    ),
    (
        "Anna  rossi (anna-rossi, ROSSIANNA?) reviewed 03/04/2021 by Dr. Smith; SSN 123-45-6789; "
        "ref 2021-11 and 11/2021; record number 99812; lab 7654321; hosp0091428 again.",
        [("patient_id", "HOSP.0091428"), ("name", "Anna Rossi")],
        [
            "rossi",
            "Rossi",
            "anna",
            "Smith",
            "123-45-6789",
            "03/04/2021",
            "99812",
            "0091428",
            "2021-11",
            "11/2021",
            "7654321",
        ],
        ["[NAME]", "[DATE]", "[ID_NUMBER]", "[ID]", "[PATIENT_ID]", "[NUMBER]"],
    ),
    (
        "患者：张伟，男，身份证号110105194912310021，电话 138 0013 8000，座机(010)65432109，"
        "2023年3月4日就诊，3月18日复查。住院号 A20231234。张 伟自述视物模糊。邮箱 zhangwei@example.cn。",
        [("patient_id", "TR-2023-00815"), ("name", "张伟")],
        [
            "张伟",
            "张 伟",
            "110105194912310021",
            "138 0013 8000",
            "65432109",
            "2023年",
            "3月18日",
            "20231234",
            "zhangwei",
        ],
        ["[NAME]", "[ID_NUMBER]", "[PHONE]", "[DATE]", "[ID]", "[EMAIL]"],
    ),
    (
        "姓名：王芳  病历号：ＴＲ－２０２３－００８１６  电话：１３９１２３４５６７８  日期：２０２３年５月６日  ID TR2023 00816",
        [("patient_id", "TR-2023-00816"), ("name", "王芳")],
        ["王芳", "１３９１２３４５６７８", "２０２３年５月６日", "ＴＲ－２０２３－００８１６", "00816"],
        ["[NAME]", "[PATIENT_ID]", "[PHONE]", "[DATE]"],
    ),
]

CLINICAL = [
    "Cup-to-disc ratio 0.6 in the right eye, 0.4 in the left.",
    "IOP 21 mmHg OD, 18 mmHg OS at 10:30.",
    "Diabetic retinopathy stage 2, no macular oedema.",
    "Visual acuity 20/40 OD and 6/9 OS; logMAR 0.30.",
    "Central macular thickness 285 μm; axial length 23.45 mm.",
    "HbA1c 7.2%; follow up in 3 months.",
    "Refraction -3.50 DS / -0.75 DC x 180.",
    "Blood pressure 140/90 mmHg.",
    "Haemorrhages in 4 quadrants (4-2-1 rule), grade 3 hypertensive retinopathy (Keith-Wagener-Barker).",
    "Laser photocoagulation: 1200 burns of 200 μm, 1.5 disc diameters from the fovea.",
    "OCT 6 x 6 mm, 512 x 128 scans; ETDRS 85 letters.",
    "Patient is a 63-year-old man with 2+ nuclear sclerosis.",
    "杯盘比0.6，眼压21 mmHg。",
    "糖尿病视网膜病变2期，黄斑水肿（-）。",
    "视力：右眼0.8，左眼0.5。",
    "患者双眼视物模糊2年，3个月后复查。",
    "左眼视盘边界清，C/D约0.3，黄斑中心凹反光可见。",
    "no abnormality. impression: mild non-proliferative diabetic retinopathy.",
]


def _squeezed(text: str) -> str:
    return re.sub(r"[\s\W_]+", "", unicodedata.normalize("NFKC", text).casefold())


@pytest.mark.parametrize(("report", "ids", "gone", "placeholders"), REPORTS)
def test_identifiers_leave_english_and_chinese_reports(report, ids, gone, placeholders):
    clean = scrub_text(report, ids)
    for secret in gone:
        assert secret not in clean, clean
    for _, value in ids:
        assert _squeezed(value) not in _squeezed(clean), clean  # whatever the case and spacing
    for name in placeholders:
        assert name in clean, clean
    assert not re.search(r"\d{6,}", unicodedata.normalize("NFKC", clean)), clean


@pytest.mark.parametrize("sentence", CLINICAL)
def test_clinical_text_comes_through_unchanged(sentence):
    ids = [("patient_id", "HOSP.0091427"), ("name", "Anna Rossi"), ("mrn", "77120934"), ("name", "张伟")]
    assert scrub_text(sentence, ids) == sentence


def test_short_numeric_ids_are_left_alone_rather_than_eat_clinical_numbers():
    # A 2-digit id cannot be told from "IOP 21 mmHg": it is not replaced (the audit reports it as unsearchable).
    assert scrub_text("IOP 21 mmHg, stage 2.", [("patient_id", "21")]) == "IOP 21 mmHg, stage 2."
    assert scrub_text("patient 2021 seen", [("patient_id", "2021")]) == "patient [PATIENT_ID] seen"


def _reports(out):
    found = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".txt"):
                    found[m.name] = tf.extractfile(m).read().decode()
    return found


def test_build_scrubs_patient_and_eye_reports(tmp_path):
    manifest, images = synth.write_raw_archive(tmp_path / "raw", 4, seed=2, image_size=64, layout="dir")
    rows = list(csv.DictReader(manifest.open(encoding="utf-8")))
    for i, row in enumerate(rows):
        who = synth.identifying_details(i, 2)
        row["report"] = synth.identifying_report(i, row["patient_id"], who, row["report"])
        row["left_report"] = f"{who['patient_name']} ({who['mrn']}): no abnormality."
        row["right_report"] = "no abnormality."
        row["patient_name"], row["mrn"] = who["patient_name"], who["mrn"]
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    small = ["--image-size", "32", "--min-side", "32", "--no-progress"]
    argv = build_argv(manifest, images, tmp_path / "out", *small, "--scrub-reports")
    assert cli.main([*argv, "--identifier-columns", "patient_name, mrn"]) == 0
    reports = _reports(tmp_path / "out")
    assert len(reports) == 12
    text = "\n".join(reports.values())
    for row in rows:
        for secret in (row["patient_name"], row["mrn"], row["patient_id"]):
            assert secret not in text
    assert "[PATIENT_NAME] ([MRN]): no abnormality." in reports.values()
    assert "impression:" in text  # the clinical part stays
    options = json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]
    assert options["scrub_reports"] is True and options["identifier_columns"] == "patient_name, mrn"
    # Without the flag the same reports are copied as they are.
    assert cli.main(build_argv(manifest, images, tmp_path / "plain", *small)) == 0
    assert rows[0]["mrn"] in "\n".join(_reports(tmp_path / "plain").values())


def test_unknown_identifier_column_is_one_line_exit_2(tmp_path, capsys):
    manifest, images = synth.write_raw_archive(tmp_path / "raw", 2, seed=2, image_size=64, layout="dir")
    argv = build_argv(manifest, images, tmp_path / "out", "--no-progress", "--identifier-columns", "name")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no column(s) ['name'] (--identifier-columns)" in err and len(err.strip().splitlines()) == 1
    retclip = synth.write_retclip_dir(tmp_path / "rc", 2, image_size=64)
    argv = ["build", "--retclip-dir", str(retclip), "--output_dir", str(tmp_path / "o2")]
    assert cli.main([*argv, "--identifier-columns", "name"]) == 2
    assert "--identifier-columns needs a --manifest" in capsys.readouterr().err

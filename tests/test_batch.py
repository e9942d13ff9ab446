"""Batch prediction (issue 12 #3): several files, a folder or a zip -> one row per image, a CSV and overlays;
bounded in count and bytes; one bad file never fails the batch. Through the library, the Predict tab's handler,
``/predict_batch`` over HTTP and ``python -m covid_cls predict DIR_OR_ZIP --csv``."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from helpers import CXR_REAL, copy_checkpoint, launched_app, make_services

COLUMNS = ["file", "label", "decision", "p_infected", "p_normal", "reasons", "error"]
CORRUPT = {  # three ways a file in a zip can be unusable
    "truncated.png": lambda good: good[: len(good) // 3],
    "not-an-image.png": lambda good: b"patient notes, not a picture\n" * 20,
    "empty.jpg": lambda good: b"",
}


def _png(seed: int, size: int = 96) -> bytes:
    from covid_cls.synthetic import synthetic_xray

    buf = io.BytesIO()
    Image.fromarray(synthetic_xray(size, infected=seed % 2 == 0, seed=seed)[0]).save(buf, "PNG")
    return buf.getvalue()


def _zip_with_corrupt(path: Path, n_good: int) -> Path:
    """A zip of ``n_good`` synthetic X-rays, the three CORRUPT files and a README (not an image: skipped)."""
    good = _png(0)
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n_good):
            zf.writestr(f"batch/xray-{i:03d}.png", _png(i))
        for name, make in CORRUPT.items():
            zf.writestr(f"batch/{name}", make(good))
        zf.writestr("batch/README.txt", "not an image")
    return path


def _check_csv(text: str, n: int) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == COLUMNS and len(rows) == n
    return rows


@pytest.fixture
def svc(tmp_path, fc_checkpoint):
    s = make_services(tmp_path, training=True)
    copy_checkpoint(fc_checkpoint, s.settings.checkpoints)
    return s


# ---------------------------------------------------------------------------------------------
# the handler (no server)
# ---------------------------------------------------------------------------------------------


def test_a_zip_with_three_corrupt_files_gives_three_error_rows_and_answers_the_rest(svc, tmp_path):
    from covid_cls.ui.batch import predict_batch

    z = _zip_with_corrupt(tmp_path / "upload.zip", n_good=20)
    table, csv_path, gallery = predict_batch(svc, [str(z)], "resnet18", "fc", "best for this pair")
    assert list(table.columns) == COLUMNS and len(table) == 23
    errors = table[table.label == "error"]
    assert sorted(Path(f).name for f in errors.file) == sorted(CORRUPT)
    assert all(e for e in errors.error)                                   # each says why
    answered = table[table.label != "error"]
    assert len(answered) == 20 and set(answered.label) <= {"infected", "normal", "uncertain"}
    assert ((answered.p_infected + answered.p_normal - 1).abs() < 1e-3).all()
    assert (answered[answered.label == "uncertain"].reasons != "").all()
    rows = _check_csv(Path(csv_path).read_text(encoding="utf-8"), 23)
    assert {r["file"] for r in rows} == set(table.file)
    assert len(gallery) == 20 and all(max(img.size) <= 320 for img, _ in gallery)
    assert not z.exists()                                                 # the upload is not kept


def test_several_files_keep_their_order_and_one_bad_file_is_its_own_row(svc, tmp_path):
    from covid_cls.ui.batch import predict_batch

    paths = []
    for i in range(4):
        p = tmp_path / f"x{i}.png"
        p.write_bytes(_png(i) if i != 2 else b"\x00" * 100)
        paths.append(str(p))
    table, _, gallery = predict_batch(svc, paths, "resnet18", "fc", "")
    assert list(table.file) == ["x0.png", "x1.png", "x2.png", "x3.png"]
    assert list(table.label == "error") == [False, False, True, False] and len(gallery) == 3


def test_the_batch_is_bounded_in_count_and_bytes(svc, tmp_path, monkeypatch):
    from gradio import Error

    from covid_cls.ui.batch import predict_batch

    monkeypatch.setenv("COVID_CLS_BATCH_MAX_FILES", "5")
    z = _zip_with_corrupt(tmp_path / "big.zip", n_good=6)
    with pytest.raises(Error, match="the batch holds 9 images; at most 5"):
        predict_batch(svc, [str(z)], "resnet18", "fc", "")
    monkeypatch.setenv("COVID_CLS_BATCH_MAX_FILES", "200")
    monkeypatch.setenv("COVID_CLS_BATCH_MAX_MB", "1")
    z = tmp_path / "large.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", _png(1))
        zf.writestr("padding.bin", b"\x00" * (2 * 2**20))   # 2 MB declared: over the 1 MB cap
    with pytest.raises(Error, match="expands to 2 MB"):
        predict_batch(svc, [str(z)], "resnet18", "fc", "")
    monkeypatch.delenv("COVID_CLS_BATCH_MAX_MB")
    svc.settings.max_upload = 4000                                        # per file: one too large, one fine
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    big.write_bytes(_png(3, size=256))
    small.write_bytes(_png(4, size=32))
    table, _, _ = predict_batch(svc, [str(big), str(small)], "resnet18", "fc", "")
    assert list(table.label == "error") == [True, False] and "per file" in table.error[0]


def test_a_zip_that_escapes_is_refused_before_anything_is_written(svc, tmp_path):
    from gradio import Error

    from covid_cls.ui.batch import predict_batch

    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../../escaped.png", _png(1))
    with pytest.raises(Error, match="outside the archive"):
        predict_batch(svc, [str(z)], "resnet18", "fc", "")
    assert not (tmp_path.parent / "escaped.png").exists()


def test_without_a_model_or_files_the_batch_says_so(svc, tmp_path, monkeypatch):
    """An API client gets the error (in the browser it is a hint: test_ui_handlers)."""
    from gradio import Error

    from covid_cls.ui import common
    from covid_cls.ui.batch import predict_batch

    monkeypatch.setattr(common, "is_api_call", lambda: True)
    p = tmp_path / "a.png"
    p.write_bytes(_png(1))
    with pytest.raises(Error, match="No trained model for VGG16 · full"):
        predict_batch(svc, [str(p)], "vgg16", "full", "")
    with pytest.raises(Error, match="Upload images"):
        predict_batch(svc, [], "resnet18", "fc", "")


def test_multi_file_inputs_are_checked_before_gradio_preprocesses_them():
    import gradio as gr

    from covid_cls.ui.common import raw_input_problem

    files = gr.File(label="Images", file_count="multiple", render=False)
    assert raw_input_problem(files, [{"path": "/tmp/a.png"}, {"path": "/tmp/b.png"}]) is None
    assert "expected a list" in raw_input_problem(files, {"path": "/tmp/a.png"})
    assert "expected files" in raw_input_problem(files, ["hello"])
    assert "expected files" in raw_input_problem(files, [{"path": "a\x00b"}])
    assert "at most 1000" in raw_input_problem(files, [{"path": "a"}] * 1001)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def test_cli_predicts_a_folder_and_a_zip_into_a_csv(fc_checkpoint, tmp_path, capsys):
    from covid_cls.__main__ import main

    folder = tmp_path / "folder" / "sub"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"x{i}.png").write_bytes(_png(i))
    (folder / "notes.txt").write_text("skipped")
    out = tmp_path / "out.csv"
    assert main(["predict", str(tmp_path / "folder"), "--checkpoint", str(fc_checkpoint), "--csv", str(out),
                 "--overlay-dir", str(tmp_path / "ov")]) == 0
    rows = _check_csv(out.read_text(encoding="utf-8"), 3)
    assert [r["file"] for r in rows] == ["sub/x0.png", "sub/x1.png", "sub/x2.png"]
    assert len(list((tmp_path / "ov").glob("sub__x*_gradcam.png"))) == 3
    text = capsys.readouterr().out
    assert "3 image(s)" in text and "1 file(s) skipped" in text and "not a diagnosis" in text

    z = _zip_with_corrupt(tmp_path / "b.zip", n_good=5)
    assert main(["predict", str(z), "--checkpoint", str(fc_checkpoint), "--csv", str(out)]) == 1   # bad files
    rows = _check_csv(out.read_text(encoding="utf-8"), 8)
    assert sum(r["label"] == "error" for r in rows) == 3
    assert "truncated.png" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# /predict_batch over HTTP
# ---------------------------------------------------------------------------------------------


@pytest.mark.http
def test_predict_batch_endpoint_on_real_xrays_and_a_zip_with_corrupt_files(fc_checkpoint, tmp_path):
    from gradio_client import handle_file

    from covid_cls.ui import Settings

    real = sorted((CXR_REAL / "test").rglob("*.jpg"))[:50] if (CXR_REAL / "test").is_dir() else []
    settings = Settings(checkpoints=tmp_path / "checkpoints", runs=tmp_path / "runs", training=True)
    copy_checkpoint(fc_checkpoint, settings.checkpoints)
    with launched_app(settings) as app:
        client = app.client()
        assert "/predict_batch" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        z = _zip_with_corrupt(tmp_path / "upload.zip", n_good=47)
        table, csv_path, gallery = client.predict([handle_file(str(z))], "resnet18", "fc", "",
                                                  api_name="/predict_batch")
        assert table["headers"] == COLUMNS and len(table["data"]) == 50
        labels = [row[1] for row in table["data"]]
        assert labels.count("error") == 3 and len(gallery) == 47
        _check_csv(Path(csv_path).read_text(encoding="utf-8"), 50)
        if len(real) < 50:
            pytest.skip("the 50 real X-rays of ../shared/data/cxr-real/test are not here")
        table, csv_path, gallery = client.predict([handle_file(str(p)) for p in real], "resnet18", "fc", "",
                                                  api_name="/predict_batch")
        assert len(table["data"]) == 50 and len(gallery) == 50
        assert "error" not in [row[1] for row in table["data"]]
        rows = _check_csv(Path(csv_path).read_text(encoding="utf-8"), 50)
        assert sorted(r["file"] for r in rows) == sorted(p.name for p in real)

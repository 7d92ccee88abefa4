"""The results schema (metrics/schema.py): what check() refuses, and that the runs' results.json conform."""

from __future__ import annotations

import json
import math

import pytest

from tiled_hydra.metrics import schema

VALID = {  # one valid value per kind
    "fraction": 0.75, "seconds": 1.5, "bytes": 1024, "count": 3, "rate": 2.5, "ratio": 0.0, "difference": -0.01, "ms": 12.0, "text": "padim",
    "fraction_by_size": {"<0.01%": 0.5, ">=1%": math.nan}, "count_by_size": {"<0.01%": 2, ">=1%": 0},
    "fraction_by_fpr_and_size": {"0.01": {"<0.01%": 0.5, ">=1%": math.nan}},
}


def complete() -> dict:
    """Every key of the schema with a valid value."""
    return {field.key: VALID.get(field.kind) for field in schema.FIELDS}


def test_every_kind_has_a_valid_example_and_a_complete_result_conforms():
    assert set(schema.KINDS) <= set(VALID), "add an example of the new kind to VALID"
    assert schema.problems(complete()) == []
    schema.check(complete())
    required = {f.key: VALID[f.kind] for f in schema.FIELDS if f.required}
    assert schema.problems(required) == []  # the optional keys may be left out


def test_an_unknown_key_is_refused():
    results = complete() | {"image_auroc": 0.9}  # misspelt
    assert schema.problems(results) == ["image_auroc: not in the results schema (tiled_hydra/metrics/schema.py)"]
    with pytest.raises(ValueError, match="image_auroc: not in the results schema"):
        schema.check(results)


def test_a_missing_required_key_is_refused_and_an_optional_one_is_not():
    results = complete()
    del results["image_AUROC"]
    assert schema.problems(results) == ["image_AUROC: missing"]
    optional = next(f.key for f in schema.FIELDS if not f.required)
    results = complete()
    del results[optional]
    assert schema.problems(results) == []


@pytest.mark.parametrize("key, value", [
    ("image_AUROC", 1.2), ("image_AUROC", -0.01), ("pixel_AUPRO", 2), ("image_F1", "0.5"), ("image_AUROC", None),
    ("image_AUROC", True),
])
def test_an_out_of_range_or_mistyped_fraction_is_refused(key, value):
    found = schema.problems(complete() | {key: value})
    assert found == [f"{key}={value!r}: expected {schema.KINDS['fraction']}"]
    with pytest.raises(ValueError, match=key):
        schema.check(complete() | {key: value})


def test_nan_is_a_fraction_and_null_is_an_optional_value():
    assert schema.problems(complete() | {"image_AUROC": math.nan}) == []  # undefined (one class only)
    optional = next(f for f in schema.FIELDS if not f.required)
    assert schema.problems(complete() | {optional.key: None}) == []


@pytest.mark.parametrize("key, value", [
    ("train_peak_mem_bytes", 1.5),  # bytes are integers
    ("train_peak_mem_bytes", -1),
    ("num_models", True),  # a bool is no count
    ("infer_images_per_second", 0),  # a rate is > 0
    ("train_seconds", -0.1),
    ("setup", 3.5),
    ("region_recall_by_size", {"<0.01%": 1.5}),
    ("region_count_by_size", {"<0.01%": 0.5}),
])
def test_other_kinds_are_checked_too(key, value):
    assert [p.split(": expected")[0] for p in schema.problems(complete() | {key: value})] == [f"{key}={value!r}"]


def test_every_problem_is_named_at_once():
    results = complete() | {"image_AUROC": 3, "extra": 1}
    del results["seed"]
    with pytest.raises(ValueError) as err:
        schema.check(results)
    assert all(part in str(err.value) for part in ("extra: not in", "seed: missing", "image_AUROC=3"))


def test_the_runs_results_files_conform(trained_run):
    # The pipeline checks its results before writing results.json; the files as written conform too
    # (JSON turns NaN into NaN and keeps integers integers).
    for model, setup in (("padim", "ens4"), ("padim", "st9"), ("padim", "sm256")):
        results = json.loads((trained_run(model, setup).run_dir / "results.json").read_text())
        assert schema.problems(results) == [], (model, setup)
    assert "latency_ms" in json.loads((trained_run("padim", "st9").run_dir / "results.json").read_text())


def test_the_printed_table_shows_every_labelled_key(trained_run, capsys, monkeypatch):
    from tiled_hydra.reporting.results import print_table

    monkeypatch.setenv("COLUMNS", "200")
    results = trained_run("padim", "st9").results
    print_table(results, "a note below the table")
    out = capsys.readouterr().out
    for field in schema.FIELDS:
        if field.label is not None and field.key in results:
            assert field.label in out, field.key
    assert "a note below the table" in out


def test_every_numeric_kind_prints_short_in_the_results_table():
    from tiled_hydra.reporting.results import format_value

    for kind, example in VALID.items():
        if isinstance(example, float):  # a printed float of full precision (0.030635017825212774) is noise
            assert len(format_value(kind, example + 1e-9)) <= 10, kind


def test_every_results_key_is_documented_in_the_run_directory_page():
    from tests.helpers import REPO

    page = (REPO / "docs" / "run-directory.md").read_text()
    assert [f.key for f in schema.FIELDS if f"| `{f.key}` |" not in page] == []

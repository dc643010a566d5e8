"""The shipped R4 definitions are exactly what the generator makes from the official package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapter.fhir import _generate

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "fhir-packages" / "hl7.fhir.r4.core-4.0.1.tgz"


@pytest.mark.skipif(not SOURCE.exists(), reason=f"source package not found at {SOURCE}")
def test_regenerating_gives_no_diff() -> None:
    generated = _generate.generate(SOURCE)
    assert {"r4-index.json", "r4-valuesets.json", "r4-searchparams.json", "r4-fhirpath.json"} <= set(generated)
    shipped_types = {f"r4-types/{p.name}" for p in (_generate.OUT_DIR / "r4-types").glob("*.json")}
    assert shipped_types == {name for name in generated if name.startswith("r4-types/")}
    for name, content in generated.items():
        shipped = (_generate.OUT_DIR / name).read_bytes()
        assert shipped == content, f"{name} differs from a fresh generation: run python -m adapter.fhir._generate"


def test_generated_files_name_their_source() -> None:
    for name in (
        "r4-index.json",
        "r4-types/Patient.json",
        "r4-valuesets.json",
        "r4-searchparams.json",
        "r4-fhirpath.json",
    ):
        header = json.loads((_generate.OUT_DIR / name).read_bytes())["_header"]
        assert header["source"] == "hl7.fhir.r4.core#4.0.1"
        assert header["generator"] == "adapter/fhir/_generate.py"


def test_model_has_every_r4_resource_and_choice_expansion() -> None:
    from adapter.fhir import model

    types = model.resource_types()
    assert {"Patient", "ServiceRequest", "CarePlan", "Bundle", "Parameters", "Binary"} <= types
    assert not {"Resource", "DomainResource", "HumanName", "string"} & types
    assert model.type_model("Resource").abstract and model.type_model("DomainResource").abstract
    children = model.context_for("Observation").children
    assert {"valueQuantity", "valueCodeableConcept", "valuePeriod"} <= set(children)
    assert "value" not in children
    assert model.context_for("Patient").children["id"].type_code == "id"
    status = model.context_for("Observation").children["status"].element
    assert status.min == 1 and status.raw["binding"]["strength"] == "required"
    codes = model.value_set_codes("http://hl7.org/fhir/ValueSet/administrative-gender")
    assert codes == {"http://hl7.org/fhir/administrative-gender": frozenset({"male", "female", "other", "unknown"})}
    assert model.search_parameters()["http://hl7.org/fhir/SearchParameter/Patient-identifier"]["type"] == "token"


def test_shipped_fhirpath_trees_match_a_fresh_parse() -> None:
    from adapter.fhir import fhirpath, model

    expression = "name.exists() or telecom.exists() or address.exists() or organization.exists()"  # pat-1
    shipped = model.fhirpath_tree(expression)
    assert shipped is not None and shipped == fhirpath.parse_fhirpath(expression)
    assert model.fhirpath_tree("name.exists() and 1 = 2") is None

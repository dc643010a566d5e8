"""FHIR R4 XML codec: round trips, the JSON <-> XML rules of https://hl7.org/fhir/R4/xml.html, errors
that name the path, and hardened parsing (DTDs, entities, size and depth limits)."""

from __future__ import annotations

import copy
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from adapter.errors import AdapterError, InputTooLargeError, ParseError, UnknownTypeError, UnsafeXmlError
from adapter.fhir import json_format, xml_format
from adapter.fhir.xml_format import dumps, loads

EXAMPLES = sorted((Path(__file__).parent / "data" / "r4-examples").glob("*.json"))
F = "{http://hl7.org/fhir}"
H = "{http://www.w3.org/1999/xhtml}"
XHTML = 'xmlns="http://www.w3.org/1999/xhtml"'


def exact(value: Any) -> Any:
    """A comparable form where decimals keep their written text (0.40 != 0.4) and bools are not ints.

    A decimal written ``100`` parses from JSON as int and from XML as ``Decimal("100")``: same text.
    """
    if isinstance(value, dict):
        return {key: exact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [exact(item) for item in value]
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | Decimal):
        return ("number", str(value))
    return (type(value).__name__, value)


def xml_tree(resource: dict[str, Any], *, pretty: bool = False) -> etree._Element:
    return etree.fromstring(dumps(resource, pretty=pretty))


def round_trip(resource: dict[str, Any]) -> dict[str, Any]:
    return loads(dumps(resource))


def patient_xml(body: str, attributes: str = "") -> bytes:
    return f'<Patient xmlns="http://hl7.org/fhir"{attributes}>{body}</Patient>'.encode()


def one_line(exc: pytest.ExceptionInfo[AdapterError]) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# --- round trips over the official examples ------------------------------------------------------


def test_sample_is_present() -> None:
    assert len(EXAMPLES) == 233


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_official_example_round_trips_exactly(path: Path) -> None:
    original = json_format.loads(path.read_bytes())
    xml = dumps(original)
    back = loads(xml)
    assert exact(back) == exact(original)  # narrative strings included, character for character
    assert dumps(back) == xml  # and writing again gives the same bytes
    assert exact(loads(dumps(original, pretty=True))) == exact(original)


def test_full_corpus_round_trip_is_in_the_bench() -> None:
    # The 5,306 files run in `python -m bench.roundtrip`; the comparison it uses must see decimals.
    from bench.roundtrip import compare

    assert compare({"v": Decimal("0.40")}, {"v": Decimal("0.4")}) is not None
    assert compare({"v": 100}, {"v": Decimal("100")}) is None
    assert compare({"v": True}, {"v": 1}) is not None
    kind, reason = compare({"div": f"<div {XHTML}><td></td></div>"}, {"div": f"<div {XHTML}><td/></div>"}) or ("", "")
    assert kind == "div" and """<td></td></div>' became '""" in reason and reason.endswith("""<td/></div>'""")
    assert compare({"div": f"<div {XHTML}><td>a</td></div>"}, {"div": f"<div {XHTML}><td/></div>"}) is not None


# --- primitives: value attribute, id, extensions, arrays with nulls ----------------------------


def test_primitive_with_id_and_extension() -> None:
    # The example of https://hl7.org/fhir/R4/json.html#primitive
    resource = {
        "resourceType": "Patient",
        "birthDate": "1970-03-30",
        "_birthDate": {
            "id": "314159",
            "extension": [{"url": "http://example.org/fhir/StructureDefinition/text", "valueString": "Easter 1970"}],
        },
    }
    birth_date = xml_tree(resource).find(F + "birthDate")
    assert birth_date is not None
    assert dict(birth_date.items()) == {"id": "314159", "value": "1970-03-30"}
    (extension,) = birth_date
    assert extension.tag == F + "extension"
    assert extension.get("url") == "http://example.org/fhir/StructureDefinition/text"
    assert extension[0].tag == F + "valueString" and extension[0].get("value") == "Easter 1970"
    assert round_trip(resource) == resource


def test_primitive_with_only_an_extension_has_no_value_key() -> None:
    xml = patient_xml(
        '<gender><extension url="http://hl7.org/fhir/StructureDefinition/data-absent-reason">'
        '<valueCode value="unknown"/></extension></gender>'
    )
    assert loads(xml) == {
        "resourceType": "Patient",
        "_gender": {
            "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]
        },
    }


def test_primitive_arrays_align_with_nulls() -> None:
    resource = {
        "resourceType": "Patient",
        "name": [
            {
                "given": ["Anne", None, "Claire"],
                "_given": [None, {"id": "g2", "extension": [{"url": "http://e.org/x", "valueBoolean": True}]}, None],
            }
        ],
    }
    name = xml_tree(resource).find(F + "name")
    assert name is not None
    given = name.findall(F + "given")
    assert [g.get("value") for g in given] == ["Anne", None, "Claire"]
    assert [g.get("id") for g in given] == [None, "g2", None]
    assert round_trip(resource) == resource


def test_primitive_array_with_only_extensions_gives_only_the_underscore_array() -> None:
    xml = patient_xml('<name><given id="a"/><given id="b"/></name>')
    assert loads(xml)["name"] == [{"_given": [{"id": "a"}, {"id": "b"}]}]


def test_primitive_array_without_ids_has_no_underscore_array() -> None:
    assert loads(patient_xml('<name><given value="A"/><given value="B"/></name>'))["name"] == [{"given": ["A", "B"]}]


def test_repeating_elements_are_arrays_even_when_single() -> None:
    result = loads(patient_xml('<name><given value="A"/></name><gender value="male"/>'))
    assert result["name"] == [{"given": ["A"]}]
    assert result["gender"] == "male"


@pytest.mark.parametrize("written", ["0.40", "1.0E+2", "-0.000", "100", "3.14159265358979323846264338"])
def test_decimals_keep_their_written_form(written: str) -> None:
    resource = json_format.loads(
        f'{{"resourceType":"Observation","status":"final","code":{{"text":"x"}},"valueQuantity":{{"value":{written}}}}}'
    )
    value_el = xml_tree(resource).find(f"{F}valueQuantity/{F}value")
    assert value_el is not None and value_el.get("value") == written
    back = round_trip(resource)["valueQuantity"]["value"]
    assert isinstance(back, Decimal) and str(back) == written


def test_xml_decimal_is_decimal_with_exact_text() -> None:
    xml = patient_xml('<extension url="http://e.org/x"><valueDecimal value="0.40"/></extension>')
    value = loads(xml)["extension"][0]["valueDecimal"]
    assert type(value) is Decimal and str(value) == "0.40"


def test_integers_and_booleans_get_json_types() -> None:
    result = loads(patient_xml('<active value="false"/><multipleBirthInteger value="-3"/>'))
    assert result["active"] is False
    assert type(result["multipleBirthInteger"]) is int and result["multipleBirthInteger"] == -3
    result = loads(
        b'<Questionnaire xmlns="http://hl7.org/fhir"><status value="draft"/>'
        b'<item><linkId value="1"/><type value="string"/><maxLength value="10"/></item></Questionnaire>'
    )
    assert type(result["item"][0]["maxLength"]) is int


@pytest.mark.parametrize(
    ("element", "value"),
    [
        ("active", "True"),
        ("active", "1"),
        ("multipleBirthInteger", "2.0"),
        ("multipleBirthInteger", "01"),
        ("multipleBirthInteger", "1_000"),
        ("multipleBirthInteger", " 1"),
    ],
)
def test_invalid_primitive_values_are_refused(element: str, value: str) -> None:
    with pytest.raises(ParseError, match=f"not a valid .* at Patient.{element}"):
        loads(patient_xml(f'<{element} value="{value}"/>'))


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1_000", " 1", "1e", "+1", ""])
def test_invalid_decimals_are_refused(value: str) -> None:
    xml = patient_xml(f'<extension url="http://e.org/x"><valueDecimal value="{value}"/></extension>')
    with pytest.raises(ParseError, match=r"not a valid decimal at Patient.extension\[0\].valueDecimal"):
        loads(xml)


def test_values_with_markup_and_white_space_survive() -> None:
    text = "a & b < c > \"d\" 'e'\n\tline two\r\n  "
    resource = {"resourceType": "Patient", "name": [{"text": text}]}
    assert b"&#10;" in dumps(resource) and b"&#9;" in dumps(resource)  # else the parser folds them
    assert round_trip(resource) == resource


def test_characters_xml_cannot_hold_are_refused_with_the_path() -> None:
    with pytest.raises(ParseError, match=r"U\+0001.* at Patient.name\[0\].family"):
        dumps({"resourceType": "Patient", "name": [{"family": "a\x01b"}]})


# --- choice types, ids, extension urls, order --------------------------------------------------


def test_choice_elements_keep_their_names() -> None:
    resource = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "weight"},
        "effectiveDateTime": "2024-01-02",
        "valueQuantity": {"value": Decimal("72.5"), "unit": "kg"},
    }
    root = xml_tree(resource)
    assert root.find(F + "effectiveDateTime") is not None
    assert root.find(f"{F}valueQuantity/{F}unit") is not None
    assert round_trip(resource) == resource


def test_unknown_choice_type_is_refused() -> None:
    with pytest.raises(ParseError, match="unknown element 'deceasedString' at Patient"):
        loads(patient_xml('<deceasedString value="x"/>'))
    with pytest.raises(ParseError, match="unknown property 'deceasedString'"):
        dumps({"resourceType": "Patient", "deceasedString": "x"})


def test_resource_id_is_an_element_but_element_id_is_an_attribute() -> None:
    resource = {
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"id": "n1", "family": "Doe"}],
        "contact": [{"id": "c1", "name": {"family": "Roe"}}],
    }
    root = xml_tree(resource)
    assert root.get("id") is None
    resource_id = root.find(F + "id")
    assert resource_id is not None and resource_id.get("value") == "p1"
    name = root.find(F + "name")
    assert name is not None and name.get("id") == "n1" and name.find(F + "id") is None
    contact = root.find(F + "contact")
    assert contact is not None and contact.get("id") == "c1"
    assert round_trip(resource) == resource


def test_extension_url_is_an_attribute() -> None:
    resource = {
        "resourceType": "Patient",
        "extension": [
            {
                "id": "e1",
                "url": "http://e.org/outer",
                "extension": [{"url": "http://e.org/inner", "valueCode": "x"}],
            }
        ],
    }
    extension = xml_tree(resource).find(F + "extension")
    assert extension is not None
    assert dict(extension.items()) == {"id": "e1", "url": "http://e.org/outer"}
    assert extension.find(F + "url") is None
    assert [child.tag for child in extension] == [F + "extension"]
    assert round_trip(resource) == resource


def test_attribute_elements_cannot_take_primitive_extensions() -> None:
    with pytest.raises(ParseError, match="'_url' cannot be written"):
        dumps({"resourceType": "Patient", "extension": [{"url": "http://e", "_url": {"id": "x"}}]})


def test_elements_follow_the_definition_order() -> None:
    resource = {
        "gender": "female",
        "name": [{"given": ["A"], "family": "B", "use": "official"}],
        "active": True,
        "extension": [{"valueString": "v", "url": "http://e"}],
        "id": "x",
        "resourceType": "Patient",
    }
    root = xml_tree(resource)
    assert [etree.QName(child).localname for child in root] == ["id", "extension", "active", "name", "gender"]
    name = root.find(F + "name")
    assert name is not None
    assert [etree.QName(child).localname for child in name] == ["use", "family", "given"]


# --- contained and nested resources ------------------------------------------------------------


def test_contained_resources_are_wrapped_in_their_type() -> None:
    resource = {
        "resourceType": "Patient",
        "contained": [
            {"resourceType": "Organization", "id": "org", "name": "Clinic"},
            {"resourceType": "Practitioner", "id": "gp", "active": True},
        ],
        "generalPractitioner": [{"reference": "#gp"}],
        "managingOrganization": {"reference": "#org"},
    }
    root = xml_tree(resource)
    assert [child[0].tag for child in root.findall(F + "contained")] == [F + "Organization", F + "Practitioner"]
    assert round_trip(resource) == resource


def test_bundle_entries_and_outcomes() -> None:
    resource = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [
            {
                "fullUrl": "urn:uuid:1",
                "resource": {"resourceType": "Patient", "id": "1", "active": True},
                "response": {
                    "status": "201 Created",
                    "outcome": {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "information", "code": "informational"}],
                    },
                },
            },
            {"response": {"status": "204"}},
        ],
    }
    root = xml_tree(resource)
    assert root.find(f"{F}entry/{F}resource/{F}Patient/{F}active") is not None
    assert root.find(f"{F}entry/{F}response/{F}outcome/{F}OperationOutcome/{F}issue") is not None
    assert round_trip(resource) == resource


def test_parameters_resource() -> None:
    resource = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "return", "resource": {"resourceType": "Patient", "id": "p"}},
            {"name": "count", "valueInteger": 3},
            {"name": "nested", "part": [{"name": "x", "valueBoolean": False}]},
        ],
    }
    root = xml_tree(resource)
    assert root.find(f"{F}parameter/{F}resource/{F}Patient") is not None
    assert round_trip(resource) == resource


def test_wrapper_with_two_resources_is_refused() -> None:
    xml = patient_xml("<contained><Organization/><Organization/></contained>")
    with pytest.raises(ParseError, match=r"more than one resource .* at Patient.contained\[0\]"):
        loads(xml)


def test_unknown_contained_type() -> None:
    with pytest.raises(UnknownTypeError, match="unknown resource type 'Spaceship'"):
        loads(patient_xml("<contained><Spaceship/></contained>"))
    with pytest.raises(UnknownTypeError, match=r"'Spaceship' at Patient.contained\[0\]"):
        dumps({"resourceType": "Patient", "contained": [{"resourceType": "Spaceship"}]})


# --- narrative XHTML ---------------------------------------------------------------------------


def test_div_is_embedded_as_xhtml_and_comes_back_as_the_same_string() -> None:
    div = f'<div {XHTML}><p class="x">Tom &amp; Jerry &lt;3<br/><b>bold</b> é</p><table><tr><td/></tr></table></div>'
    resource = {"resourceType": "Patient", "text": {"status": "generated", "div": div}}
    root = xml_tree(resource)
    embedded = root.find(f"{F}text/{H}div")
    assert embedded is not None
    assert embedded.find(f"{H}p/{H}b") is not None  # real elements, not escaped text
    assert round_trip(resource) == resource


def test_div_in_pretty_output_keeps_its_white_space() -> None:
    div = f"<div {XHTML}><p>a</p><p>b</p>\n  <pre>  x\n</pre></div>"
    resource = {"resourceType": "Patient", "text": {"status": "generated", "div": div}}
    assert loads(dumps(resource, pretty=True)) == resource


def test_div_line_ends_and_attribute_white_space_survive() -> None:
    div = f'<div {XHTML}><p title="one\ntwo\tthree">a\r\nb\rc</p>\r\n</div>'
    resource = {"resourceType": "Patient", "text": {"status": "generated", "div": div}}
    assert round_trip(resource) == resource


def test_div_quotes_in_text_are_written_as_in_the_official_examples() -> None:
    # The reference implementation writes &quot; in text; XML cannot tell the two apart.
    div = f'<div {XHTML}><p title="a&quot;b">say "hi"</p></div>'
    back = round_trip({"resourceType": "Patient", "text": {"status": "generated", "div": div}})
    assert back["text"]["div"] == f'<div {XHTML}><p title="a&quot;b">say &quot;hi&quot;</p></div>'


def test_div_comments_are_kept_and_foreign_declarations_dropped() -> None:
    xml = patient_xml(
        f"<text><status value='generated'/><div {XHTML}><!-- note --><p>x</p></div></text>",
        ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"',
    )
    assert loads(xml)["text"]["div"] == f"<div {XHTML}><!-- note --><p>x</p></div>"


def test_div_with_svg_keeps_its_namespace() -> None:
    div = f'<div {XHTML}><svg xmlns="http://www.w3.org/2000/svg"><circle r="1"/></svg></div>'
    back = round_trip({"resourceType": "Patient", "text": {"status": "generated", "div": div}})
    parsed = etree.fromstring(back["text"]["div"].encode())
    assert parsed.find("{http://www.w3.org/2000/svg}svg/{http://www.w3.org/2000/svg}circle") is not None


@pytest.mark.parametrize(
    ("div", "message"),
    [
        ("<div>no namespace</div>", "must be an XHTML <div>"),
        (f"<p {XHTML}>x</p>", "must be an XHTML <div>"),
        (f"<div {XHTML}><p>open</div>", "not well-formed XHTML"),
        (f"<div {XHTML}>&nbsp;</div>", "not well-formed XHTML"),
    ],
)
def test_bad_div_strings_are_refused_with_the_path(div: str, message: str) -> None:
    with pytest.raises(ParseError, match=f"{message}.* at Patient.text.div"):
        dumps({"resourceType": "Patient", "text": {"status": "generated", "div": div}})


def test_div_in_the_fhir_namespace_is_unknown() -> None:
    with pytest.raises(ParseError, match=r"unknown element 'div' at Patient.text"):
        loads(patient_xml("<text><status value='generated'/><div><p>x</p></div></text>"))


# --- XML -> JSON on a handwritten document ------------------------------------------------------

HANDWRITTEN = f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- comments and processing instructions are ignored -->
<Patient xmlns="http://hl7.org/fhir" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://hl7.org/fhir ../../schema/patient.xsd">
  <id value="example"/>
  <?some-tool keep-out?>
  <meta>
    <versionId value="1"/>
    <lastUpdated value="2024-05-01T10:00:00Z"/>
  </meta>
  <text>
    <status value="generated"/>
    <div {XHTML}><p>Peter <b>Chalmers</b><br/>born 1974</p></div>
  </text>
  <extension url="http://example.org/fhir/StructureDefinition/importance">
    <valueCodeableConcept>
      <coding><system value="http://example.org/importance"/><code value="VIP"/></coding>
    </valueCodeableConcept>
  </extension>
  <identifier>
    <use value="usual"/>
    <system value="https://fhir.nhs.uk/Id/nhs-number"/>
    <value value="9990000018"/>
  </identifier>
  <active value="true"/>
  <name id="n1">
    <!-- the official name -->
    <use value="official"/>
    <family value="Chalmers"/>
    <given value="Peter"/>
    <given value="James"/>
  </name>
  <name>
    <use value="nickname"/>
    <given value="Jim"/>
  </name>
  <gender value="male"/>
  <birthDate id="bd" value="1974-12-25">
    <extension url="http://hl7.org/fhir/StructureDefinition/patient-birthTime">
      <valueDateTime value="1974-12-25T14:35:45-05:00"/>
    </extension>
  </birthDate>
  <deceasedBoolean value="false"/>
  <multipleBirthInteger value="2"/>
  <contact>
    <relationship>
      <coding>
        <system value="http://terminology.hl7.org/CodeSystem/v2-0131"/>
        <code value="N"/>
      </coding>
    </relationship>
  </contact>
  <managingOrganization>
    <reference value="Organization/1"/>
  </managingOrganization>
</Patient>
"""


def test_handwritten_patient() -> None:
    assert loads(HANDWRITTEN) == {
        "resourceType": "Patient",
        "id": "example",
        "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00Z"},
        "text": {"status": "generated", "div": f"<div {XHTML}><p>Peter <b>Chalmers</b><br/>born 1974</p></div>"},
        "extension": [
            {
                "url": "http://example.org/fhir/StructureDefinition/importance",
                "valueCodeableConcept": {"coding": [{"system": "http://example.org/importance", "code": "VIP"}]},
            }
        ],
        "identifier": [{"use": "usual", "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}],
        "active": True,
        "name": [
            {"id": "n1", "use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
            {"use": "nickname", "given": ["Jim"]},
        ],
        "gender": "male",
        "birthDate": "1974-12-25",
        "_birthDate": {
            "id": "bd",
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                    "valueDateTime": "1974-12-25T14:35:45-05:00",
                }
            ],
        },
        "deceasedBoolean": False,
        "multipleBirthInteger": 2,
        "contact": [
            {"relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}]}]}
        ],
        "managingOrganization": {"reference": "Organization/1"},
    }


def test_handwritten_patient_as_bytes_with_bom() -> None:
    assert loads(b"\xef\xbb\xbf" + HANDWRITTEN.encode()) == loads(HANDWRITTEN)


def test_pretty_output_is_indented_and_equivalent() -> None:
    resource = loads(HANDWRITTEN)
    pretty = dumps(resource, pretty=True)
    assert pretty.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<Patient xmlns="http://hl7.org/fhir">\n  <id')
    assert b'\n    <versionId value="1"/>\n' in pretty
    assert loads(pretty) == resource
    assert len(dumps(resource).splitlines()) == 2  # declaration, then the document on one line


# --- errors name the element and its path -------------------------------------------------------


def test_unknown_element_names_the_path() -> None:
    with pytest.raises(ParseError) as exc:
        loads(patient_xml('<name><family value="A"/></name><name><foo/></name>'))
    assert one_line(exc) == "unknown element 'foo' at Patient.name[1] (line 1)"
    assert exc.value.expression == "Patient.name[1]"


def test_unknown_element_deep_in_a_bundle() -> None:
    xml = (
        b'<Bundle xmlns="http://hl7.org/fhir"><type value="collection"/><entry/><entry><resource>'
        b'<Patient>\n<name><given value="A"/><given value="B"><extension url="u"><bogus/></extension></given>'
        b"</name></Patient></resource></entry></Bundle>"
    )
    with pytest.raises(ParseError) as exc:
        loads(xml)
    assert one_line(exc) == (
        "unknown element 'bogus' at Bundle.entry[1].resource.name[0].given[1].extension[0] (line 2)"
    )


def test_unknown_attribute_and_text_are_refused() -> None:
    with pytest.raises(ParseError, match=r"unknown attribute 'lang' at Patient.name\[0\]"):
        loads(patient_xml('<name lang="en"><family value="A"/></name>'))
    with pytest.raises(ParseError, match=r"unknown attribute 'foo' at Patient.gender"):
        loads(patient_xml('<gender value="male" foo="1"/>'))
    with pytest.raises(ParseError, match=r"unexpected text 'Smith' at Patient.name\[0\]"):
        loads(patient_xml('<name><family value="A"/>Smith</name>'))


def test_repeated_single_element_is_refused() -> None:
    with pytest.raises(ParseError, match="element 'gender' repeated at Patient"):
        loads(patient_xml('<gender value="male"/><gender value="female"/>'))


def test_empty_primitive_is_refused() -> None:
    with pytest.raises(ParseError, match=r"no value, id or extension at Patient.active"):
        loads(patient_xml("<active/>"))


def test_root_must_be_a_known_fhir_resource() -> None:
    with pytest.raises(UnknownTypeError, match="unknown resource type 'HumanName'"):
        loads(b'<HumanName xmlns="http://hl7.org/fhir"/>')
    with pytest.raises(ParseError, match="not in the FHIR namespace"):
        loads(b"<Patient><id value='x'/></Patient>")


def test_json_errors_name_the_path() -> None:
    resource = {
        "resourceType": "Patient",
        "name": [{"family": "A"}, {"given": ["x", "y"], "_given": [None, {"extension": [{"url": 1}]}]}],
    }
    with pytest.raises(ParseError) as exc:
        dumps(resource)
    assert one_line(exc) == "expected a string, found number 1 at Patient.name[1]._given[1].extension[0].url"
    assert exc.value.expression == "Patient.name[1]._given[1].extension[0].url"

    with pytest.raises(ParseError, match=r"unknown property 'nickname' in HumanName at Patient.name\[0\]"):
        dumps({"resourceType": "Patient", "name": [{"nickname": "x"}]})
    with pytest.raises(ParseError, match=r"expected a boolean, found number 1 at Patient.active"):
        dumps({"resourceType": "Patient", "active": 1})
    with pytest.raises(ParseError, match=r"expected a integer, found boolean at Patient.multipleBirthInteger"):
        dumps({"resourceType": "Patient", "multipleBirthInteger": True})
    with pytest.raises(ParseError, match=r"expected an array, found object at Patient.name"):
        dumps({"resourceType": "Patient", "name": {"family": "A"}})
    with pytest.raises(ParseError, match=r"different lengths at Patient.name"):
        dumps({"resourceType": "Patient", "name": [{"given": ["a"], "_given": [None, None]}]})


def test_unknown_or_missing_resource_type_in_json() -> None:
    with pytest.raises(UnknownTypeError, match="unknown resource type 'Spaceship'"):
        dumps({"resourceType": "Spaceship"})
    with pytest.raises(ParseError, match="no resourceType"):
        dumps({"id": "x"})


# --- hardened parsing --------------------------------------------------------------------------

BILLION_LAUGHS = (Path(__file__).parent / "data" / "xml" / "billion-laughs.xml").read_bytes()
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE Patient [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Patient xmlns="http://hl7.org/fhir"><id value="&xxe;"/><name><family value="&xxe;"/></name></Patient>
"""
EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE Patient SYSTEM "http://example.invalid/fhir.dtd">
<Patient xmlns="http://hl7.org/fhir"><id value="x"/></Patient>
"""
DTD_AFTER_PROLOG = b'\xef\xbb\xbf<?xml version="1.0"?>\n<!-- hi -->\n<?pi x?>\n<!DOCTYPE Patient>\n' + patient_xml("")


@pytest.fixture
def parser_must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if lxml is asked to parse: a DOCTYPE must be refused before anything is read."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the XML parser was called on a document with a DOCTYPE")

    monkeypatch.setattr(etree, "fromstring", refuse)


@pytest.mark.usefixtures("parser_must_not_run")
@pytest.mark.parametrize(
    "document",
    [BILLION_LAUGHS, XXE, EXTERNAL_DTD, DTD_AFTER_PROLOG],
    ids=["billion-laughs", "xxe", "external-dtd", "dtd-after-prolog"],
)
def test_doctype_is_refused_before_parsing(document: bytes) -> None:
    start = time.perf_counter()
    with pytest.raises(UnsafeXmlError) as exc:
        loads(document)
    assert time.perf_counter() - start < 0.5
    message = one_line(exc)
    assert "DOCTYPE" in message
    assert "lol" not in message and "root:" not in message
    assert exc.value.issue()["code"] == "security"


def test_billion_laughs_as_text_is_refused() -> None:
    with pytest.raises(UnsafeXmlError):
        loads(BILLION_LAUGHS.decode())


def test_doctype_inside_a_narrative_is_refused() -> None:
    div = f'<!DOCTYPE div [<!ENTITY x "y">]><div {XHTML}>&x;</div>'
    with pytest.raises(UnsafeXmlError, match=r"at Patient.text.div"):
        dumps({"resourceType": "Patient", "text": {"status": "generated", "div": div}})


def test_entity_reference_without_dtd_is_not_expanded() -> None:
    with pytest.raises(ParseError, match="line 1 column"):
        loads(patient_xml('<name><family value="&xxe;"/></name>'))


def _nested_extensions(levels: int) -> bytes:
    return patient_xml('<extension url="u">' * levels + '<valueString value="x"/>' + "</extension>" * levels)


def test_nesting_within_the_limit_is_read() -> None:
    result = loads(_nested_extensions(xml_format.MAX_DEPTH - 2))
    depth, node = 0, result
    while "extension" in node:
        node, depth = node["extension"][0], depth + 1
    assert depth == xml_format.MAX_DEPTH - 2 and node["valueString"] == "x"


@pytest.mark.parametrize("levels", [xml_format.MAX_DEPTH + 1, 300, 5000])
def test_over_deep_nesting_is_too_large(levels: int) -> None:
    # 300 and 5000 are beyond libxml2's own limit (256), which must also come out as too large.
    with pytest.raises(InputTooLargeError) as exc:
        loads(_nested_extensions(levels))
    assert "deeper than" in one_line(exc) or "limit" in str(exc.value)


def test_over_deep_narrative_is_too_large() -> None:
    div = f"<div {XHTML}>" + "<span>" * 130 + "x" + "</span>" * 130 + "</div>"
    with pytest.raises(InputTooLargeError):
        loads(patient_xml(f"<text><status value='generated'/>{div}</text>"))
    with pytest.raises(InputTooLargeError, match=r"at Patient.text.div"):
        dumps({"resourceType": "Patient", "text": {"status": "generated", "div": div}})


def test_over_deep_json_is_too_large() -> None:
    resource: dict[str, Any] = {"resourceType": "Patient"}
    node = resource
    for _ in range(xml_format.MAX_DEPTH + 5):
        child: dict[str, Any] = {"url": "u"}
        node["extension"] = [child]
        node = child
    with pytest.raises(InputTooLargeError, match="deeper than"):
        dumps(resource)


def test_oversize_document_is_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    assert xml_format.MAX_BYTES == 50 * 1024 * 1024
    document = patient_xml('<name><family value="' + "x" * 2000 + '"/></name>')
    monkeypatch.setattr(xml_format, "MAX_BYTES", 1000)
    with pytest.raises(InputTooLargeError, match="larger than 1,000 bytes"):
        loads(document)
    with pytest.raises(InputTooLargeError):
        loads(document.decode())


def test_value_over_the_parser_text_limit_is_too_large() -> None:
    # Without huge_tree libxml2 stops at 10 MB in one attribute (e.g. a large Binary.data).
    document = patient_xml('<name><family value="' + "x" * (10_000_001) + '"/></name>')
    with pytest.raises(InputTooLargeError, match="parser limit"):
        loads(document)


@pytest.mark.parametrize(
    "document",
    [
        patient_xml('<name><family value="A"/>')[:-10],
        b'<Patient xmlns="http://hl7.org/fhir"><name><family value="A"/>',
        b'<Patient xmlns="http://hl7.org/fhir"><name><family value="A></name></Patient>',
        b"",
        b"not xml at all",
    ],
    ids=["cut", "unclosed", "unclosed-quote", "empty", "text"],
)
def test_malformed_xml_is_a_parse_error_with_position(document: bytes) -> None:
    with pytest.raises(ParseError) as exc:
        loads(document)
    message = one_line(exc)
    assert message.startswith("not well-formed XML: ")
    assert " at line 1 column " in message


def test_not_utf8_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="not well-formed XML"):
        loads(patient_xml("<name><family value='Müller'/></name>").decode().encode("latin-1"))
    with pytest.raises(ParseError):
        loads("<Patient xmlns='http://hl7.org/fhir'/>".encode("utf-16"))


def test_loads_does_not_change_what_it_was_given() -> None:
    resource = json_format.loads(EXAMPLES[0].read_bytes())
    before = copy.deepcopy(resource)
    dumps(resource, pretty=True)
    assert resource == before

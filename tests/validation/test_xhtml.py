"""Narrative checks (txt-1, txt-2): the quick path without a tree agrees with lxml's tree (#2)."""

from __future__ import annotations

import pytest

from adapter.validation.xhtml import _passes, _problem, check_xhtml

NS = 'xmlns="http://www.w3.org/1999/xhtml"'

#: Divs the quick path must accept by itself (the commonest shapes of the R4 examples' narratives).
PLAIN = [
    f"<div {NS}><p>Ann Smith</p></div>",
    f"<div {NS}>\n  <table><tr><td>a &lt; b</td></tr></table>\n</div>",
    f'<div {NS}><p title="x > y">text</p></div>',
    f"<div {NS}><p>&#160;</p><span>  &amp; </span></div>",
    f'<div {NS}><a href="http://e.org?a=1&amp;b=2">link</a></div>',
    f"<div\n {NS}>Ünïcödé ✓</div>",
]

#: Divs the quick path must leave to the tree, with whether the tree accepts them.
LEFT_TO_THE_TREE = {
    # not well-formed
    f"<div {NS}><p>unclosed</div>": False,
    f"<div {NS}><p>a &nbsp; b</p></div>": False,
    f"<div {NS}><p a='1' a='2'>x</p></div>": False,
    f"<div {NS}>x</div><div {NS}>y</div>": False,
    # not allowed, or not the XHTML div
    f"<div {NS}><script>x</script></div>": False,
    f'<div {NS}><p onclick="go()">x</p></div>': False,
    "<div><p>no namespace</p></div>": False,
    f"<p {NS}>not a div</p>": False,
    f'<div {NS}><p xmlns="urn:other">x</p></div>': False,
    '<h:div xmlns:h="http://www.w3.org/1999/xhtml">x</h:div>': True,
    # no content (txt-2), or content only an image or a no-break space gives
    f"<div {NS}>  <p> </p>\n</div>": False,
    f"<div {NS}><p>&#160;</p></div>": False,
    f'<div {NS}><p title="a > b"/></div>': False,
    f'<div {NS}><img src="a.png"/></div>': True,
    # comments, CDATA and processing instructions: not plain text between tags
    f"<div {NS}><!-- a comment only --></div>": False,
    f"<div {NS}><![CDATA[text in CDATA]]></div>": True,
    f'<?xml version="1.0"?><div {NS}>x</div>': True,
    f'<div {NS} xml:id="1 2">x</div>': False,
    # prefixed attributes: libxml2 without a tree does not check that the prefix is declared
    f'<div {NS}><p x:y="1">text</p></div>': False,
    f'<div {NS}><p class:="grid">text</p></div>': False,
    f'<div {NS} xml:lang="en"><b>x</b><br/></div>': True,
    f'<div {NS} xmlns:x="urn:x"><p x:y="1">text</p></div>': True,
}


@pytest.mark.parametrize("div", PLAIN)
def test_plain_divs_pass_without_a_tree(div: str) -> None:
    assert _problem(div.encode()) is None  # the tree agrees
    assert _passes(div.encode()), "the quick path should decide this div (otherwise validation slows down)"
    assert check_xhtml(div) is None


@pytest.mark.parametrize(("div", "valid"), LEFT_TO_THE_TREE.items())
def test_other_divs_are_left_to_the_tree(div: str, valid: bool) -> None:
    assert not _passes(div.encode())
    assert (check_xhtml(div) is None) == valid
    assert check_xhtml(div) == _problem(div.encode())


def test_no_content_is_found_past_text_in_an_attribute() -> None:
    """A ">" in an attribute value does not end its tag: the text after it is not content."""
    div = f'<div {NS}><p title="x > looks like text"></p></div>'
    assert not _passes(div.encode())
    assert check_xhtml(div) == "the narrative has no content (txt-2)"

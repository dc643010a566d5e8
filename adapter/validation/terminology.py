"""Terminology for profile validation: is a code in a ValueSet?

:class:`LocalTerminology` expands what the loaded packages (and the compiled R4 model) can answer
alone (https://hl7.org/fhir/R4/valueset.html#expansion): enumerated concepts, whole code systems
whose content is complete, included and excluded ValueSets, and ``is-a``/``descendent-of``/``=``
filters on a code system we hold. Anything else, above all SNOMED CT intensional ValueSets (ECL),
is not expandable here: :meth:`Terminology.contains` answers ``None`` ("not checked"), never True.

:class:`RemoteTerminology` asks a terminology server (``$validate-code``, with an OAuth2 client
credentials token when configured) for what the local one cannot answer, and caches the answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from adapter.fhir import model

__all__ = ["ChainedTerminology", "LocalTerminology", "RemoteTerminology", "Terminology"]

Codes = frozenset[tuple[str | None, str]]


class Terminology(Protocol):
    def contains(self, value_set: str, system: str | None, code: str) -> bool | None:
        """True or False when known, None when the ValueSet cannot be checked here."""
        ...


def _concepts(concepts: list[dict[str, Any]], system: str, out: set[tuple[str | None, str]]) -> None:
    for concept in concepts:
        if isinstance(concept.get("code"), str):
            out.add((system, concept["code"]))
        _concepts(concept.get("concept") or [], system, out)


def _descendants(concepts: list[dict[str, Any]], code: str, include_self: bool) -> list[str]:
    """Codes under ``code`` in a hierarchical CodeSystem (``concept`` nesting)."""
    for concept in concepts:
        if concept.get("code") == code:
            found: set[tuple[str | None, str]] = set()
            _concepts(concept.get("concept") or [], "", found)
            return ([code] if include_self else []) + sorted(c for _, c in found)
        below = _descendants(concept.get("concept") or [], code, include_self)
        if below:
            return below
    return []


class LocalTerminology:
    """Expansions from the packages' ValueSets and CodeSystems (see the module doc)."""

    def __init__(self, resolve: Callable[[str], dict[str, Any] | None]) -> None:
        self._resolve = resolve
        self._expansions: dict[str, Codes | None] = {}

    def contains(self, value_set: str, system: str | None, code: str) -> bool | None:
        codes = self.expand(value_set)
        if codes is None:
            return None
        if system is None:
            return any(c == code for _, c in codes)
        return (system, code) in codes

    def expand(self, url: str, seen: frozenset[str] = frozenset()) -> Codes | None:
        url = url.split("|", 1)[0]
        if url in self._expansions:
            return self._expansions[url]
        if url in seen:
            return None
        self._expansions[url] = found = self._expand(url, seen | {url})
        return found

    def _expand(self, url: str, seen: frozenset[str]) -> Codes | None:
        value_set = self._resolve(url)
        if value_set is None:
            core = model.value_set_codes(url)
            if core is None:
                return None
            return frozenset((system, code) for system, codes in core.items() for code in codes)
        compose = value_set.get("compose")
        if not isinstance(compose, dict):
            return None
        included: set[tuple[str | None, str]] = set()
        for include in compose.get("include") or []:
            part = self._part(include, seen)
            if part is None:
                return None
            included |= part
        for exclude in compose.get("exclude") or []:
            part = self._part(exclude, seen)
            if part is None:
                return None
            included -= part
        return frozenset(included)

    def _part(self, include: dict[str, Any], seen: frozenset[str]) -> set[tuple[str | None, str]] | None:
        """One include/exclude: the intersection of its system part and its value sets."""
        result: set[tuple[str | None, str]] | None = None
        system = include.get("system")
        if isinstance(system, str):
            result = self._system_part(system, include)
            if result is None:
                return None
        for reference in include.get("valueSet") or []:
            codes = self.expand(reference, seen)
            if codes is None:
                return None
            result = set(codes) if result is None else result & codes
        return result or set()

    def _system_part(self, system: str, include: dict[str, Any]) -> set[tuple[str | None, str]] | None:
        if include.get("concept"):
            return {(system, c["code"]) for c in include["concept"] if isinstance(c.get("code"), str)}
        code_system = self._code_system(system)
        if code_system is None:
            return None
        all_codes: set[tuple[str | None, str]] = set()
        _concepts(code_system.get("concept") or [], system, all_codes)
        result = all_codes
        for flt in include.get("filter") or []:
            op, value, prop = flt.get("op"), flt.get("value"), flt.get("property")
            if op in ("is-a", "descendent-of") and prop == "concept" and isinstance(value, str):
                below = _descendants(code_system.get("concept") or [], value, op == "is-a")
                result = result & {(system, c) for c in below}
            elif op == "=" and prop == "concept" and isinstance(value, str):
                result = result & {(system, value)}
            elif op == "in" and prop == "concept" and isinstance(value, str):
                result = result & {(system, v.strip()) for v in value.split(",")}
            else:
                return None
        return result

    def _code_system(self, system: str) -> dict[str, Any] | None:
        found = self._resolve(system)
        if found is None or found.get("resourceType") != "CodeSystem" or found.get("content") != "complete":
            return None
        return found


class RemoteTerminology:
    """Answers from a FHIR terminology server: ``GET [base]/ValueSet/$validate-code?url=&system=&code=``
    (https://hl7.org/fhir/R4/valueset-operation-validate-code.html), cached per (ValueSet, system, code).

    With ``token_url`` (and client id and secret) it first gets a bearer token by OAuth2 client
    credentials (RFC 6749 section 4.4) and renews it when the server answers 401. A server that
    cannot be reached, or answers with an error, gives None ("not checked"), never a pass.
    Validation is synchronous, so this uses :class:`httpx.Client`; pass ``client`` to reuse one (or
    to give tests a mock transport).
    """

    def __init__(
        self,
        base_url: str,
        *,
        client: Any = None,
        token_url: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self._client: httpx.Client = client or httpx.Client(timeout=timeout)
        self._token_url = token_url
        self._credentials = (client_id or "", client_secret or "")
        self._token: str | None = None
        self._cache: dict[tuple[str, str | None, str], bool | None] = {}
        self.failures: list[str] = []

    def _bearer(self, renew: bool = False) -> dict[str, str]:
        if self._token_url is None:
            return {}
        if self._token is None or renew:
            response = self._client.post(
                self._token_url,
                data={"grant_type": "client_credentials"},
                auth=self._credentials,
                headers={"Accept": "application/json"},
            )
            response.raise_for_status()
            self._token = str(response.json()["access_token"])
        return {"Authorization": f"Bearer {self._token}"}

    def contains(self, value_set: str, system: str | None, code: str) -> bool | None:
        key = (value_set, system, code)
        if key in self._cache:
            return self._cache[key]
        import httpx

        params = {"url": value_set, "code": code}
        if system is not None:
            params["system"] = system
        answer: bool | None = None
        try:
            for renew in (False, True):
                response = self._client.get(
                    f"{self.base_url}/ValueSet/$validate-code",
                    params=params,
                    headers={"Accept": "application/fhir+json", **self._bearer(renew)},
                )
                if response.status_code != 401:
                    break
            if response.status_code == 200:
                for parameter in response.json().get("parameter") or ():
                    if parameter.get("name") == "result" and isinstance(parameter.get("valueBoolean"), bool):
                        answer = parameter["valueBoolean"]
            else:
                self.failures.append(f"{value_set}: HTTP {response.status_code}")
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            self.failures.append(f"{value_set}: {type(exc).__name__}: {exc}")
        self._cache[key] = answer
        return answer


class ChainedTerminology:
    """The first answer that is not None, asking each terminology in turn (local before remote)."""

    def __init__(self, *sources: Terminology) -> None:
        self.sources = sources

    def contains(self, value_set: str, system: str | None, code: str) -> bool | None:
        for source in self.sources:
            answer = source.contains(value_set, system, code)
            if answer is not None:
                return answer
        return None

"""The search index tables and the SQL that searches them, shared by the SQLite and PostgreSQL stores.

One table per kind of index value (see :mod:`adapter.search.index`), each row naming the resource
(``type``, ``id``) and the search parameter (``param``); rows describe current versions only and
are replaced on every write. A search is ``SELECT id FROM resources`` with one ``id IN (subquery)``
per criterion, so each criterion is answered from its table's ``(type, param, value)`` index; a
chain nests the same subqueries through ``sp_reference``. The SQL is written with ``?``
placeholders (the PostgreSQL store rewrites them) and only values travel as parameters.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from adapter.search.index import DATE_MAX, DATE_MIN, IndexRows
from adapter.search.query import Criterion, DateValue, NumberValue, ReferenceValue, SearchQuery, StringValue, TokenValue

__all__ = [
    "INDEX_DELETES",
    "INDEX_INSERT_COLUMNS",
    "INDEX_SCHEMA",
    "INDEX_VERSION",
    "count_sql",
    "index_inserts",
    "search_sql",
]

#: Bump when what is indexed changes: stores rebuild the index of a database with an older one.
INDEX_VERSION = "2"  # 2: dates before the year 1000 written with four-digit years

INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS sp_token (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, system TEXT, code TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sp_token_value ON sp_token (type, param, code);
CREATE INDEX IF NOT EXISTS sp_token_owner ON sp_token (type, id);
CREATE TABLE IF NOT EXISTS sp_string (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, norm TEXT NOT NULL, exact TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sp_string_value ON sp_string (type, param, norm);
CREATE INDEX IF NOT EXISTS sp_string_owner ON sp_string (type, id);
CREATE TABLE IF NOT EXISTS sp_reference (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, target_type TEXT, target_id TEXT, url TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sp_reference_value ON sp_reference (type, param, target_id);
CREATE INDEX IF NOT EXISTS sp_reference_owner ON sp_reference (type, id);
CREATE TABLE IF NOT EXISTS sp_date (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, low TEXT NOT NULL, high TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sp_date_value ON sp_date (type, param, low);
CREATE INDEX IF NOT EXISTS sp_date_owner ON sp_date (type, id);
CREATE TABLE IF NOT EXISTS sp_number (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, value DOUBLE PRECISION NOT NULL, system TEXT, code TEXT);
CREATE INDEX IF NOT EXISTS sp_number_value ON sp_number (type, param, value);
CREATE INDEX IF NOT EXISTS sp_number_owner ON sp_number (type, id);
CREATE TABLE IF NOT EXISTS searches (
    id TEXT PRIMARY KEY, created TEXT NOT NULL, type TEXT NOT NULL, query TEXT NOT NULL, ids TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# IndexRows field -> (table, its value columns)
_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "tokens": ("sp_token", ("param", "system", "code")),
    "strings": ("sp_string", ("param", "norm", "exact")),
    "references": ("sp_reference", ("param", "target_type", "target_id", "url")),
    "dates": ("sp_date", ("param", "low", "high")),
    "numbers": ("sp_number", ("param", "value", "system", "code")),
}
_TABLE_OF_TYPE = {
    "token": "sp_token",
    "uri": "sp_token",
    "string": "sp_string",
    "reference": "sp_reference",
    "date": "sp_date",
    "number": "sp_number",
    "quantity": "sp_number",
}
# Column to sort on, ascending and descending (https://hl7.org/fhir/R4/search.html#_sort: lowest
# value ascending, highest descending).
_SORT_COLUMN = {
    "sp_token": ("MIN(code)", "MAX(code)"),
    "sp_string": ("MIN(norm)", "MAX(norm)"),
    "sp_reference": ("MIN(url)", "MAX(url)"),
    "sp_date": ("MIN(low)", "MAX(high)"),
    "sp_number": ("MIN(value)", "MAX(value)"),
}


#: Removes the index rows of one resource, per table: parameters (type, id).
INDEX_DELETES = tuple(f"DELETE FROM {table} WHERE type = ? AND id = ?" for table, _ in _TABLES.values())


#: IndexRows field -> the INSERT of one row of its table (parameters: type, id, then the columns).
_INSERTS = {
    name: f"INSERT INTO {table} (type, id, {', '.join(columns)}) VALUES ({', '.join('?' * (len(columns) + 2))})"
    for name, (table, columns) in _TABLES.items()
}
#: Each INSERT of :func:`index_inserts` -> (its table, all its columns), for a dialect that writes
#: many rows in one statement.
INDEX_INSERT_COLUMNS = {_INSERTS[name]: (table, ("type", "id", *columns)) for name, (table, columns) in _TABLES.items()}


def index_inserts(type: str, id: str, rows: IndexRows, into: dict[str, list[tuple[Any, ...]]]) -> None:
    """Add the INSERTs of one resource's index rows to ``into`` (SQL -> parameter rows), so that a
    transaction writes each table with one ``executemany``."""
    for name in _TABLES:
        values = getattr(rows, name)
        if values:
            into.setdefault(_INSERTS[name], []).extend((type, id, *value) for value in values)


def _like(text: str, contains: bool) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%" if contains else f"{escaped}%"


def _approximate(low: str, high: str) -> tuple[str, str]:
    """``ap``: the range widened by 10% of its distance from now on each side
    (https://hl7.org/fhir/R4/search.html#prefix)."""
    now = datetime.utcnow()
    start = datetime.fromisoformat(low)
    end = datetime.fromisoformat(high) if high != DATE_MAX else datetime.max
    gap = max(abs(now - start), abs(end - now) if end != datetime.max else timedelta(0)) / 10
    wide_low = start - gap if start - datetime.min > gap else datetime.min
    wide_high = end + gap if datetime.max - end > gap else datetime.max
    # isoformat: four-digit years, as the index writes them (strftime's %Y drops the leading zero).
    return (wide_low.isoformat(timespec="microseconds") if wide_low != datetime.min else DATE_MIN), (
        wide_high.isoformat(timespec="microseconds") if wide_high != datetime.max else DATE_MAX
    )


def _date_condition(value: DateValue, low: str, high: str) -> tuple[str, list[Any]]:
    """Resource range [low, high) against search range [sl, sh) (https://hl7.org/fhir/R4/search.html#date)."""
    sl, sh = value.low, value.high
    match value.prefix:
        case "eq":
            return f"({low} >= ? AND {high} <= ?)", [sl, sh]
        case "ne":
            return f"NOT ({low} >= ? AND {high} <= ?)", [sl, sh]
        case "gt":
            return f"{high} > ?", [sh]
        case "lt":
            return f"{low} < ?", [sl]
        case "ge":
            return f"{high} > ?", [sl]
        case "le":
            return f"{low} < ?", [sh]
        case "sa":
            return f"{low} >= ?", [sh]
        case "eb":
            return f"{high} <= ?", [sl]
    wide_low, wide_high = _approximate(sl, sh)
    return f"({low} < ? AND {high} > ?)", [wide_high, wide_low]


def _number_condition(value: NumberValue) -> tuple[str, list[Any]]:
    """https://hl7.org/fhir/R4/search.html#number: ``eq`` honours the precision written."""
    v = value.value
    params: list[Any]
    match value.prefix:
        case "eq":
            sql, params = "(value >= ? AND value < ?)", [value.low, value.high]
        case "ne":
            sql, params = "NOT (value >= ? AND value < ?)", [value.low, value.high]
        case "gt" | "sa":
            sql, params = "value > ?", [v]
        case "lt" | "eb":
            sql, params = "value < ?", [v]
        case "ge":
            sql, params = "value >= ?", [v]
        case "le":
            sql, params = "value <= ?", [v]
        case _:
            sql, params = "(value >= ? AND value <= ?)", sorted([v * 0.9, v * 1.1])
    if value.system is not None:
        sql, params = f"{sql} AND system = ?", [*params, value.system]
    if value.code is not None:
        sql, params = f"{sql} AND code = ?", [*params, value.code]
    return f"({sql})", params


def _value_condition(criterion: Criterion, value: object) -> tuple[str, list[Any]]:
    if isinstance(value, TokenValue):
        if value.code is None:
            return "system = ?", [value.system]
        if value.system is None:
            return "code = ?", [value.code]
        if value.system == "":
            return "(code = ? AND system IS NULL)", [value.code]
        return "(code = ? AND system = ?)", [value.code, value.system]
    if isinstance(value, StringValue):
        if criterion.modifier == "exact":
            return "exact = ?", [value.text]
        return "norm LIKE ? ESCAPE '\\'", [_like(value.normalised, criterion.modifier == "contains")]
    if isinstance(value, ReferenceValue):
        if value.id is None:
            return "url = ?", [value.url]
        if value.type is not None:
            return "(target_type = ? AND target_id = ?)", [value.type, value.id]
        if criterion.targets:
            marks = ", ".join("?" * len(criterion.targets))
            return f"(target_id = ? AND target_type IN ({marks}))", [value.id, *criterion.targets]
        return "target_id = ?", [value.id]
    if isinstance(value, DateValue):
        return _date_condition(value, "low", "high")
    assert isinstance(value, NumberValue)
    return _number_condition(value)


def _last_updated_condition(value: DateValue) -> tuple[str, list[Any]]:
    """``_lastUpdated`` against the store's instant (``...T12:00:00.123Z``), a point rather than a
    range; the bounds are cut to the same millisecond text so that text order is time order."""
    sl, sh = value.low[:23] + "Z", value.high[:23] + "Z"
    match value.prefix:
        case "eq":
            return "(last_updated >= ? AND last_updated < ?)", [sl, sh]
        case "ne":
            return "NOT (last_updated >= ? AND last_updated < ?)", [sl, sh]
        case "gt" | "sa":
            return "last_updated >= ?", [sh]
        case "lt" | "eb":
            return "last_updated < ?", [sl]
        case "ge":
            return "last_updated >= ?", [sl]
        case "le":
            return "last_updated < ?", [sh]
    wide_low, wide_high = _approximate(value.low, value.high)
    return "(last_updated >= ? AND last_updated < ?)", [wide_low[:23] + "Z", wide_high[:23] + "Z"]


def criterion_ids(criterion: Criterion) -> tuple[str, list[Any]]:
    """A subquery giving the ids of ``criterion.type`` resources that meet ``criterion``."""
    param = criterion.param
    type = criterion.type
    if criterion.chain:
        parts: list[str] = []
        params: list[Any] = [type, param.code]
        for inner in criterion.chain:
            inner_sql, inner_params = criterion_ids(inner)
            parts.append(f"(target_type = ? AND target_id IN ({inner_sql}))")
            params += [inner.type, *inner_params]
        return f"SELECT id FROM sp_reference WHERE type = ? AND param = ? AND ({' OR '.join(parts)})", params
    if param.code in ("_id", "_lastUpdated"):
        if criterion.missing is not None:
            # Every resource has an id and a lastUpdated.
            return ("SELECT id FROM resources WHERE type = ?" + (" AND 1 = 0" if criterion.missing else "")), [type]
        conditions: list[str] = []
        params = [type]
        for value in criterion.values:
            if isinstance(value, TokenValue):
                conditions.append("id = ?")
                params.append(value.code)
            else:
                assert isinstance(value, DateValue)
                sql, more = _last_updated_condition(value)
                conditions.append(sql)
                params += more
        return f"SELECT id FROM resources WHERE type = ? AND NOT deleted AND ({' OR '.join(conditions)})", params
    table = _TABLE_OF_TYPE[param.type]
    if criterion.missing is not None:
        present = f"SELECT id FROM {table} WHERE type = ? AND param = ?"
        if criterion.missing:
            return f"SELECT id FROM resources WHERE type = ? AND id NOT IN ({present})", [type, type, param.code]
        return present, [type, param.code]
    conditions = []
    params = [type, param.code]
    for value in criterion.values:
        sql, more = _value_condition(criterion, value)
        conditions.append(sql)
        params += more
    return f"SELECT id FROM {table} WHERE type = ? AND param = ? AND ({' OR '.join(conditions)})", params


def _where(query: SearchQuery) -> tuple[str, list[Any]]:
    sql = "FROM resources r WHERE r.type = ? AND NOT r.deleted"
    params: list[Any] = [query.type]
    for criterion in query.criteria:
        inner, more = criterion_ids(criterion)
        sql += f" AND r.id IN ({inner})"
        params += more
    return sql, params


def search_sql(query: SearchQuery, first_page: bool = False) -> tuple[str, list[Any]]:
    """The ids of every match, in the order ``_sort`` asks for (then oldest first, then id).

    ``first_page``: instead, (id, json, total) of the first ``query.count`` matches only, the total
    counted by a window function: one statement answers a search that fits on one page."""
    where, params = _where(query)
    order: list[str] = []
    for key in query.sort:
        if key.param.code == "_id":
            order.append("r.id DESC" if key.descending else "r.id")
            continue
        if key.param.code == "_lastUpdated":
            order.append("r.last_updated DESC" if key.descending else "r.last_updated")
            continue
        table = _TABLE_OF_TYPE[key.param.type]
        column = _SORT_COLUMN[table][1 if key.descending else 0]
        value = f"(SELECT {column} FROM {table} s WHERE s.type = r.type AND s.id = r.id AND s.param = ?)"
        # Resources without a value come last either way.
        order.append(f"{value} IS NULL, {value}{' DESC' if key.descending else ''}")
        params += [key.param.code, key.param.code]
    order += ["r.last_updated", "r.id"]
    if first_page:
        sql = f"SELECT r.id, r.json, COUNT(*) OVER () {where} ORDER BY {', '.join(order)} LIMIT ?"
        return sql, [*params, query.count]
    return f"SELECT r.id {where} ORDER BY {', '.join(order)}", params


def count_sql(query: SearchQuery) -> tuple[str, list[Any]]:
    where, params = _where(query)
    return f"SELECT COUNT(*) {where}", params

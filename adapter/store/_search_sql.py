"""The search index tables and the SQL that searches them, shared by the SQLite and PostgreSQL stores.

One table per kind of index value (see :mod:`adapter.search.index`), each row naming the resource
(``type``, ``id``) and the search parameter (``param``); rows describe current versions only and
are replaced on every write. ``rid`` names the version a row was made from: the key of that
version's ``history`` row (its rowid in SQLite, ``seq`` in PostgreSQL), which ``resources.rid``
holds for the current version. A write removes the rows of the version it replaces by that number:
rids grow with every version written, so the ``rid`` indexes only ever grow at their right-hand
end, where owner indexes on ``(type, id)`` took an insert at a random place of their B-tree for
every row (uuid5 ids are random): about a quarter of SQLite's work in ``$ingest``
(docs/benchmarks.md). A search is ``SELECT id FROM resources`` with one ``id IN (subquery)``
per criterion, so each criterion is answered from its table's ``(type, param, value)`` index; a
chain nests the same subqueries through ``sp_reference``. The SQL is written with ``?``
placeholders (the PostgreSQL store rewrites them) and only values travel as parameters.

Long values. The token codes and string values of a resource can be of any length (an R4 string
holds up to 1 MB), but a PostgreSQL B-tree index row cannot: there those two value indexes hold the
first :data:`KEY_CHARS` characters of the value (``key_chars``; SQLite, which has no such limit,
indexes whole values with ``key_chars=None``). Every condition on them is then written on that
key, for the index, and on the whole value too wherever the key alone cannot decide.
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
    "INDEX_TABLES",
    "INDEX_VERSION",
    "KEY_CHARS",
    "TEXT_VALUE_INDEXES",
    "count_sql",
    "index_inserts",
    "index_key",
    "index_schema",
    "search_sql",
    "text_value_indexes",
]

#: Bump when what is indexed changes: stores rebuild the index of a database with an older one.
INDEX_VERSION = "3"  # 2: dates before the year 1000 written with four-digit years; 3: rid

#: Characters of a token code or string value that PostgreSQL's value indexes hold. A B-tree
#: index entry "cannot exceed approximately one-third of a page (after TOAST compression, if
#: applicable)" (https://www.postgresql.org/docs/15/btree-intro.html): 2,704 bytes
#: with 8 kB pages ("index row size ... exceeds btree version 4 maximum 2704"). 256 characters
#: take at most 1,024 bytes even if every one needs 4 bytes in UTF-8; with the row's header (8),
#: ``type`` (at most 64 characters, ``check_type``), ``param`` (at most 33, R4's longest search
#: parameter code), their length bytes, alignment and the heap TID of a pivot tuple (8), a row
#: stays under 1,200 bytes, less than half the limit whatever the text and whether or not it
#: compresses. Values that share their first 256 characters are rare enough that the index still
#: narrows a search to a handful of rows, which the condition on the whole value then decides.
KEY_CHARS = 256

#: The value indexes over text taken from the resource with no bound on its length:
#: name -> (table, column). (``sp_reference_value`` indexes ``target_id``, an id of at most 64
#: characters; a reference's ``url`` is not indexed.)
TEXT_VALUE_INDEXES = {"sp_token_value": ("sp_token", "code"), "sp_string_value": ("sp_string", "norm")}


def index_key(column: str, key_chars: int | None) -> str:
    """What a value index holds of ``column``: the whole value, or (PostgreSQL) its first
    ``key_chars`` characters in the "C" collation, code point order on UTF-8, in which the
    strings that start with a prefix form one range of the index (:func:`_starts_with`) whatever
    the database's own collation."""
    return column if key_chars is None else f'left({column}, {key_chars}) COLLATE "C"'


def text_value_indexes(key_chars: int | None) -> dict[str, str]:
    """The CREATE INDEX of each of :data:`TEXT_VALUE_INDEXES`, by name."""
    return {
        name: f"CREATE INDEX IF NOT EXISTS {name} ON {table} (type, param, {index_key(column, key_chars)})"
        for name, (table, column) in TEXT_VALUE_INDEXES.items()
    }


def index_schema(key_chars: int | None) -> str:
    """The index tables, their indexes, ``searches`` and ``store_meta`` (see :func:`index_key`)."""
    return _INDEX_SCHEMA.format_map({name: sql + ";" for name, sql in text_value_indexes(key_chars).items()})


_INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS sp_token (
    rid BIGINT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL,
    param TEXT NOT NULL, system TEXT, code TEXT NOT NULL);
{sp_token_value}
CREATE INDEX IF NOT EXISTS sp_token_owner ON sp_token (rid);
CREATE TABLE IF NOT EXISTS sp_string (
    rid BIGINT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL,
    param TEXT NOT NULL, norm TEXT NOT NULL, exact TEXT NOT NULL);
{sp_string_value}
CREATE INDEX IF NOT EXISTS sp_string_owner ON sp_string (rid);
CREATE TABLE IF NOT EXISTS sp_reference (
    rid BIGINT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL,
    param TEXT NOT NULL, target_type TEXT, target_id TEXT, url TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sp_reference_value ON sp_reference (type, param, target_id);
CREATE INDEX IF NOT EXISTS sp_reference_owner ON sp_reference (rid);
CREATE TABLE IF NOT EXISTS sp_date (
    rid BIGINT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL,
    param TEXT NOT NULL, low TEXT NOT NULL, high TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sp_date_value ON sp_date (type, param, low);
CREATE INDEX IF NOT EXISTS sp_date_owner ON sp_date (rid);
CREATE TABLE IF NOT EXISTS sp_number (
    rid BIGINT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL,
    param TEXT NOT NULL, value DOUBLE PRECISION NOT NULL, system TEXT, code TEXT);
CREATE INDEX IF NOT EXISTS sp_number_value ON sp_number (type, param, value);
CREATE INDEX IF NOT EXISTS sp_number_owner ON sp_number (rid);
CREATE TABLE IF NOT EXISTS searches (
    id TEXT PRIMARY KEY, created TEXT NOT NULL, type TEXT NOT NULL, query TEXT NOT NULL, ids TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
#: The schema of a store that indexes whole values (SQLite).
INDEX_SCHEMA = index_schema(None)

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


#: The index tables.
INDEX_TABLES = tuple(table for table, _ in _TABLES.values())
#: Removes the index rows of one version, per table: parameter (rid,).
INDEX_DELETES = tuple(f"DELETE FROM {table} WHERE rid = ?" for table in INDEX_TABLES)


#: IndexRows field -> the INSERT of one row of its table (parameters: rid, type, id, then the columns).
_INSERTS = {
    name: f"INSERT INTO {table} (rid, type, id, {', '.join(columns)}) VALUES ({', '.join('?' * (len(columns) + 3))})"
    for name, (table, columns) in _TABLES.items()
}
_INSERT_OF = tuple(_INSERTS.items())
#: Each INSERT of :func:`index_inserts` -> (its table, all its columns), for a dialect that writes
#: many rows in one statement.
INDEX_INSERT_COLUMNS = {
    _INSERTS[name]: (table, ("rid", "type", "id", *columns)) for name, (table, columns) in _TABLES.items()
}


def index_inserts(rid: int, type: str, id: str, rows: IndexRows, into: dict[str, list[tuple[Any, ...]]]) -> None:
    """Add the INSERTs of one version's index rows to ``into`` (SQL -> parameter rows), so that a
    transaction writes each table with one ``executemany``."""
    owner = (rid, type, id)
    for name, sql in _INSERT_OF:
        values = getattr(rows, name)
        if values:
            found = into.get(sql)
            if found is None:
                found = into[sql] = []
            found += [owner + value for value in values]


def _like(text: str, contains: bool) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%" if contains else f"{escaped}%"


def _equals(column: str, value: str, key_chars: int | None) -> tuple[str, list[Any]]:
    """``column = value``, on the index key (:func:`index_key`) and then on the whole value."""
    if key_chars is None:
        return f"{column} = ?", [value]
    return f"({index_key(column, key_chars)} = left(?, {key_chars}) AND {column} = ?)", [value, value]


def _after(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` in code point order, or
    None when there is none (``prefix`` is empty or all U+10FFFF)."""
    while prefix:
        last = ord(prefix[-1]) + 1
        if last <= 0x10FFFF:
            # Surrogates are not characters: U+E000 comes next after U+D7FF.
            return prefix[:-1] + chr(0xE000 if last == 0xD800 else last)
        prefix = prefix[:-1]
    return None


def _starts_with(column: str, prefix: str, key_chars: int | None) -> tuple[str, list[Any]]:
    """``column`` starts with ``prefix``. On a key of ``key_chars`` characters, a prefix no longer
    than that is one range of the index, [prefix, :func:`_after` it), which decides alone; a
    longer one is the key's equality, and the whole value decides."""
    like = f"{column} LIKE ? ESCAPE '\\'"
    if key_chars is None:
        return like, [_like(prefix, contains=False)]
    key = index_key(column, key_chars)
    if len(prefix) > key_chars:
        return f"({key} = left(?, {key_chars}) AND {like})", [prefix, _like(prefix, contains=False)]
    end = _after(prefix)
    if end is None:
        return f"{key} >= ?", [prefix]
    return f"({key} >= ? AND {key} < ?)", [prefix, end]


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


def _value_condition(criterion: Criterion, value: object, key_chars: int | None) -> tuple[str, list[Any]]:
    if isinstance(value, TokenValue):
        if value.code is None:
            return "system = ?", [value.system]
        code, params = _equals("code", value.code, key_chars)
        if value.system is None:
            return code, params
        if value.system == "":
            return f"({code} AND system IS NULL)", params
        return f"({code} AND system = ?)", [*params, value.system]
    if isinstance(value, StringValue):
        if criterion.modifier == "exact":
            return "exact = ?", [value.text]
        if criterion.modifier == "contains":
            return "norm LIKE ? ESCAPE '\\'", [_like(value.normalised, contains=True)]
        return _starts_with("norm", value.normalised, key_chars)
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


def criterion_ids(criterion: Criterion, key_chars: int | None) -> tuple[str, list[Any]]:
    """A subquery giving the ids of ``criterion.type`` resources that meet ``criterion``
    (``key_chars``: see :func:`index_key`)."""
    param = criterion.param
    type = criterion.type
    if criterion.chain:
        parts: list[str] = []
        params: list[Any] = [type, param.code]
        for inner in criterion.chain:
            inner_sql, inner_params = criterion_ids(inner, key_chars)
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
        sql, more = _value_condition(criterion, value, key_chars)
        conditions.append(sql)
        params += more
    return f"SELECT id FROM {table} WHERE type = ? AND param = ? AND ({' OR '.join(conditions)})", params


def _where(query: SearchQuery, key_chars: int | None) -> tuple[str, list[Any]]:
    sql = "FROM resources r WHERE r.type = ? AND NOT r.deleted"
    params: list[Any] = [query.type]
    for criterion in query.criteria:
        inner, more = criterion_ids(criterion, key_chars)
        sql += f" AND r.id IN ({inner})"
        params += more
    return sql, params


def search_sql(query: SearchQuery, *, key_chars: int | None, first_page: bool = False) -> tuple[str, list[Any]]:
    """The ids of every match, in the order ``_sort`` asks for (then oldest first, then id).

    ``first_page``: instead, (id, json, total) of the first ``query.count`` matches only, the total
    counted by a window function: one statement answers a search that fits on one page.
    ``key_chars``: see :func:`index_key`."""
    where, params = _where(query, key_chars)
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
        value = f"(SELECT {column} FROM {table} s WHERE s.rid = r.rid AND s.param = ?)"
        # Resources without a value come last either way.
        order.append(f"{value} IS NULL, {value}{' DESC' if key.descending else ''}")
        params += [key.param.code, key.param.code]
    order += ["r.last_updated", "r.id"]
    if first_page:
        sql = f"SELECT r.id, r.json, COUNT(*) OVER () {where} ORDER BY {', '.join(order)} LIMIT ?"
        return sql, [*params, query.count]
    return f"SELECT r.id {where} ORDER BY {', '.join(order)}", params


def count_sql(query: SearchQuery, *, key_chars: int | None) -> tuple[str, list[Any]]:
    where, params = _where(query, key_chars)
    return f"SELECT COUNT(*) {where}", params

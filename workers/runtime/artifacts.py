"""Reading a method's JSON artifact (indexcache.json, kv_precision.json, prefixkv.json) from where it lives.

An address is a local JSON path, a directory holding the file, an MLflow run id (32 hex: that
run's file of the method's standard name), or an MLflow URI (``runs:/<id>/<file>``,
``mlflow-artifacts:...``). Each method's ``workers.<method>.artifact.load`` calls `read_json`
and validates what it gets; serving and the benchmarks reach the files only through those loaders.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TypeVar

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
T = TypeVar("T")


def read_json(address: str | Path, file_name: str) -> dict:
    """address (see module docstring) -> the parsed JSON object.

    Raises FileNotFoundError (no such file, or MLflow cannot fetch it) or ValueError (not a JSON
    object), each naming the address."""
    address = str(address)
    if RUN_ID.match(address) or address.startswith(("runs:/", "mlflow-artifacts:")):
        from workers.runtime.tracking import download

        uri = f"runs:/{address}/{file_name}" if RUN_ID.match(address) else address
        try:
            path = download(uri)
        except Exception as e:  # MLflow raises several types for a missing run or artifact
            raise FileNotFoundError(f"{address!r}: cannot fetch {uri} from MLflow ({e})") from e
    else:
        path = Path(address).expanduser()
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{address!r}: no such file (expected a {file_name} path or an MLflow run id)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{address!r}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{address!r}: holds a JSON {type(data).__name__}, not an object")
    return data


def bad_field(file_name: str, field: str, value, why: str) -> ValueError:
    """The one shape of a format error: ``<file>: <field>=<value>: <why>``."""
    return ValueError(f"{file_name}: {field}={value!r}: {why}")


def check_version(d: dict, file_name: str, version: int, *, required: bool = False) -> None:
    """Refuse a file of another format version; a file without one reads as `version` unless `required`."""
    found = d.get("version") if required else d.get("version", version)
    if found != version:
        raise bad_field(file_name, "version", found, f"this reader knows version {version}")


def pick(table: dict[str, T], key: float | None, what: str) -> T:
    """The entry of {str(number): entry} whose number is `key` (to 1e-6); with key None, the only entry.

    `what` names the key in errors (e.g. "retention", "budget")."""
    if key is None:
        if len(table) == 1:
            return next(iter(table.values()))
        raise ValueError(f"holds entries for {what} {sorted(table)}; choose one with {what}=")
    for k, entry in table.items():
        if abs(float(k) - key) <= 1e-6:
            return entry
    raise ValueError(f"{what}={key!r}: entries only for {what} {sorted(table)}")

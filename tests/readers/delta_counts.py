"""Reads the history's Delta tables with two readers written elsewhere: delta-rs' Python
package (`deltalake`, whose dataset pyarrow scans) and DuckDB's `delta` extension (on
Delta Kernel), loaded from its pinned wheel, offline.

Usage: delta_counts.py ROOT SPEC, where SPEC is JSON:
  {"tables": {"<table>": <version or null for the newest>},
   "app_ids": {"<table>": ["<txn app id>", ...]}}

Prints JSON: the rows per `date` of each table as each reader finds them, and each app
id's `txn` version as `deltalake` reads it.
"""

import glob
import json
import os
import sys

import duckdb
from deltalake import DeltaTable


def delta_extension():
    found = glob.glob(
        os.path.join(
            os.path.dirname(duckdb.__file__),
            "..",
            "duckdb_ext",
            "extensions",
            "v" + duckdb.__version__,
            "*",
            "delta.duckdb_extension",
        )
    )
    if not found:
        sys.exit("the duckdb-ext-delta wheel's extension file is missing")
    return os.path.abspath(found[0])


def main():
    root, spec = sys.argv[1], json.loads(sys.argv[2])
    con = duckdb.connect(
        config={
            "autoinstall_known_extensions": "false",
            "autoload_known_extensions": "false",
        }
    )
    con.execute("LOAD '%s'" % delta_extension().replace("'", "''"))
    out = {"deltalake": {}, "duckdb": {}, "txn": {}}
    for i, (name, version) in enumerate(sorted(spec["tables"].items())):
        path = os.path.join(root, name)
        table = DeltaTable(path, version=version)
        dates = table.to_pyarrow_dataset().to_table(columns=["date"])
        out["deltalake"][name] = {
            row["date"]: row["count_all"]
            for row in dates.group_by("date").aggregate([([], "count_all")]).to_pylist()
        }
        out["txn"][name] = {
            app: table.transaction_version(app) for app in spec["app_ids"].get(name, [])
        }
        options = "TYPE delta" if version is None else "TYPE delta, VERSION %d" % version
        con.execute("ATTACH '%s' AS t%d (%s)" % (path.replace("'", "''"), i, options))
        rows = con.execute("SELECT date, count(*) FROM t%d GROUP BY date" % i).fetchall()
        out["duckdb"][name] = {date: n for date, n in rows}
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()

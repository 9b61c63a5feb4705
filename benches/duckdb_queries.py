"""Runs the history bench's queries in DuckDB (its delta extension, from the pinned
duckdb-ext-delta wheel, offline) over the same Delta tables, each three times.

Usage: duckdb_queries.py ROOT QUERIES, where QUERIES is a JSON list of [name, sql].
Prints JSON: {name: [milliseconds of each run]}. Results are fetched as Arrow tables
(as ours are Arrow batches).
"""

import glob
import json
import os
import sys
import time

import duckdb


def main():
    root, queries = sys.argv[1], json.loads(sys.argv[2])
    extension = glob.glob(
        os.path.join(
            os.path.dirname(duckdb.__file__),
            "..",
            "duckdb_ext",
            "extensions",
            "v" + duckdb.__version__,
            "*",
            "delta.duckdb_extension",
        )
    )[0]
    con = duckdb.connect(
        config={
            "autoinstall_known_extensions": "false",
            "autoload_known_extensions": "false",
        }
    )
    con.execute("LOAD '%s'" % os.path.abspath(extension))
    for table in ["delivery_requests", "delivery_events"]:
        con.execute("ATTACH '%s' AS %s (TYPE delta)" % (os.path.join(root, table), table))
    times = {}
    for name, sql in queries:
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            con.execute(sql).fetch_arrow_table()
            runs.append((time.perf_counter() - started) * 1000.0)
        times[name] = runs
    print(json.dumps(times))


if __name__ == "__main__":
    main()

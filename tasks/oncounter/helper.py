"""counterops' helper on the counter: run there as `/usr/bin/python3 - COMMAND ARGS...`, fed on stdin.

Standard library only (a counter has its system python3 but no sqlite3 command); every value
is an argument; the answer is one line of JSON on stdout, a failure one line on stderr and a
non-zero exit. The controller reads this file with importlib.resources (tasks/oncounter) and
sends it whole, so linters and tests see the same code the counter runs.

Backups (tasks/backup.py):
  snapshot ROOT STAGING PATH...  copy each ROOT/PATH to STAGING/tree/PATH, check it, archive it
                                 to STAGING/backup.tar.gz; the customer tables' row counts and
                                 the copy's data fingerprint
  check TREE                     check every database under TREE; the row counts
  fingerprint ROOT COLUMNS PATH...  the data fingerprint of the databases under each ROOT/PATH, the
                                 customer tables read over COLUMNS ({database: {table: [column...]}},
                                 "{}" for all their columns)
  swap ROOT TREE PATH...         replace each ROOT/PATH with TREE/PATH
Maintenance (tasks/maintenance.py):
  rotate LOG_DIR OVER_BYTES KEEP gzip each *.log larger than OVER_BYTES to NAME.log.STAMP.gz beside it,
                                 then truncate it (the app keeps it open: copytruncate); keep the
                                 newest KEEP archives
  database DB                    integrity_check; only when intact VACUUM, integrity_check again; the
                                 customer tables' row counts and the file's size before and after
Downgrades (tasks/downgrade.py):
  schema DB                      the data schema: the newest migration recorded in schema_migrations (0: none)
"""
import gzip
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import tarfile
import tempfile
import time
import urllib.parse

CUSTOMER_TABLES = ("customers", "cards", "transactions")  # tasks/layout.py says the same; a test keeps them equal
JOURNALS = (".db-journal", ".db-wal", ".db-shm")


def open_db(path, mode, timeout=30):
    """A database opened by URI; its schema is not trusted: functions and virtual tables named in
    views, triggers or defaults of a file that came from elsewhere are not run (trusted_schema=OFF)."""
    db = sqlite3.connect("file:%s?mode=%s" % (urllib.parse.quote(path), mode), uri=True, timeout=timeout)
    db.execute("PRAGMA trusted_schema=OFF")
    return db


def integrity(db):
    """PRAGMA integrity_check's first lines: ["ok"] for an intact database."""
    return [row[0] for row in db.execute("PRAGMA integrity_check")][:5]


def row_counts(db):
    """Rows of each customer table this database has."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {t: db.execute('SELECT COUNT(*) FROM "%s"' % t).fetchone()[0] for t in CUSTOMER_TABLES if t in tables}


# ----------------------------------------------------------------------------- backups


def copy_file(src, dst):
    """A database through SQLite's backup API (a consistent copy while the app writes),
    any other file as it is."""
    if not src.endswith(".db"):
        try:
            shutil.copy2(src, dst)
        except FileNotFoundError:
            pass  # a temporary file renamed over its target while we listed: the target is copied
        return
    # Read-write, not read-only: after a crash, a hot journal must be rolled back (as any
    # reader would) before the database shows what was committed.
    try:
        source, target = open_db(src, "rw"), sqlite3.connect(dst)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
    except sqlite3.Error as e:
        sys.exit("%s: %s" % (src, e))
    shutil.copymode(src, dst)


def skip_journals(directory, names):
    """A live journal belongs to the live database; the backup API's copy holds what is committed."""
    return [name for name in names if name.endswith(JOURNALS)]


def databases(tree):
    found = []
    for directory, subdirs, files in os.walk(tree):
        subdirs.sort()
        found += [os.path.join(directory, name) for name in sorted(files) if name.endswith(".db")]
    return found


def check(tree):
    """integrity_check every database under TREE; the customer tables' row counts, summed."""
    counts = {}
    for path in databases(tree):
        name = os.path.relpath(path, tree)
        try:
            db = open_db(path, "ro")
            try:
                verdict = integrity(db)
                if verdict != ["ok"]:
                    sys.exit("%s: integrity_check: %s" % (name, "; ".join(verdict[:3])))
                for table, rows in row_counts(db).items():
                    counts[table] = counts.get(table, 0) + rows
            finally:
                db.close()
        except sqlite3.Error as e:
            sys.exit("%s: %s" % (name, e))
    return counts


def blob(value):
    return value.hex()


def table_fingerprint(db, table, columns):
    """Rows, highest rowid and one sha256 over every row (in rowid order) of TABLE, read over COLUMNS."""
    live = [row[1] for row in db.execute('PRAGMA table_info("%s")' % table)]
    missing = [c for c in columns if c not in live]
    if missing:
        return {"columns": columns, "missing_columns": missing}
    digest, rows = hashlib.sha256(), 0
    listed = ", ".join('"%s"' % c for c in columns)
    for row in db.execute('SELECT %s FROM "%s" ORDER BY rowid' % (listed, table)):
        digest.update(json.dumps(row, default=blob, ensure_ascii=False).encode())
        digest.update(b"\n")
        rows += 1
    max_id = db.execute('SELECT MAX(rowid) FROM "%s"' % table).fetchone()[0]
    return {"columns": columns, "rows": rows, "max_id": max_id, "sha256": digest.hexdigest()}


def fingerprint(base, paths, wanted):
    """The customer tables of every database under each BASE/PATH, keyed by the database's path
    relative to BASE: {database: {table: {columns, rows, max_id, sha256}}}. A table listed in
    WANTED is read over the columns listed there (the columns a backup had); others over all theirs.
    Read in one transaction per database, so a writer cannot tear the picture."""
    result = {}
    for path in paths:
        top = os.path.join(base, path)
        found = [top] if os.path.isfile(top) and top.endswith(".db") else databases(top)
        for file in found:
            name = os.path.relpath(file, base)
            tables_wanted = wanted.get(name, {})
            try:
                db = open_db(file, "rw")  # rw: a hot journal is rolled back first, as any reader would
                try:
                    db.execute("BEGIN")
                    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                    result[name] = {
                        table: table_fingerprint(db, table, tables_wanted.get(table) or
                                                 [row[1] for row in db.execute('PRAGMA table_info("%s")' % table)])
                        for table in CUSTOMER_TABLES if table in tables
                    }
                    db.execute("ROLLBACK")
                finally:
                    db.close()
            except sqlite3.Error as e:
                sys.exit("%s: %s" % (name, e))
    return result


def snapshot(root, staging, paths):
    tree = os.path.join(staging, "tree")
    for path in paths:
        src, dst = os.path.join(root, path), os.path.join(tree, path)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, ignore=skip_journals, copy_function=copy_file)
        elif os.path.isfile(src):
            copy_file(src, dst)
        else:
            sys.exit("%s: no such file or directory on the counter" % path)
    counts = check(tree)
    with tarfile.open(os.path.join(staging, "backup.tar.gz"), "w:gz") as tar:
        for path in paths:
            tar.add(os.path.join(tree, path), arcname=path)
    return {"row_counts": counts, "fingerprint": fingerprint(tree, paths, {})}


def swap(root, tree, paths):
    """Each ROOT/PATH is at every moment either the old or the restored one, whole.

    The restored copies are first moved beside their live paths (the slow part, which may
    copy across file systems) into private holders; then each live path is renamed into its
    holder and the restored one renamed in. If that fails, the live path is put back, and a
    holder that still keeps live data is left for a human rather than deleted.
    """
    holders = []
    try:
        for path in paths:
            live = os.path.join(root, path)
            holders.append(tempfile.mkdtemp(prefix=".counterops-restore-", dir=os.path.dirname(live)))
            shutil.move(os.path.join(tree, path), os.path.join(holders[-1], "new"))
        for path, holder in zip(paths, holders):
            replace(os.path.join(root, path), holder)
    except BaseException:
        for holder in holders:
            shutil.rmtree(os.path.join(holder, "new"), ignore_errors=True)
            try:
                os.rmdir(holder)
            except OSError:
                print("kept the replaced data in %s" % holder, file=sys.stderr)
        raise
    for holder in holders:
        shutil.rmtree(holder)
    return {}


def replace(live, holder):
    old, new = os.path.join(holder, "old"), os.path.join(holder, "new")
    if os.path.lexists(live):
        os.rename(live, old)
    try:
        os.rename(new, live)
    except OSError:
        if os.path.lexists(old):
            os.rename(old, live)
        raise


# ----------------------------------------------------------------------------- maintenance


def rotate(log_dir, over_bytes, keep):
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    rotated, removed = [], []
    for name in sorted(os.listdir(log_dir)):
        path = os.path.join(log_dir, name)
        if not name.endswith(".log") or os.path.islink(path) or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        if size > int(over_bytes):
            archive = "%s.%s.gz" % (path, stamp)
            with open(path, "rb") as src, gzip.open(archive + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(archive + ".part", archive)
            with open(path, "r+b") as log:
                log.truncate(0)
            rotated.append({"log": name, "bytes": size})
        archives = sorted(n for n in os.listdir(log_dir) if n.startswith(name + ".") and n.endswith(".gz"))
        for old in archives[:-int(keep)]:
            os.remove(os.path.join(log_dir, old))
            removed.append(old)
    return {"rotated": rotated, "removed": removed}


def database(path):
    db = open_db(path, "rw", timeout=60)
    db.isolation_level = None
    try:
        found = {"integrity_before": integrity(db), "bytes_before": os.path.getsize(path),
                 "free_pages_before": db.execute("PRAGMA freelist_count").fetchone()[0]}
        if found["integrity_before"] != ["ok"]:
            return found  # damaged: left exactly as it is
        found["rows_before"] = row_counts(db)
        db.execute("VACUUM")
        found.update(integrity_after=integrity(db), rows_after=row_counts(db), bytes_after=os.path.getsize(path),
                     free_pages_after=db.execute("PRAGMA freelist_count").fetchone()[0])
        return found
    finally:
        db.close()


# ----------------------------------------------------------------------------- downgrades


def schema(path):
    db = open_db(path, "ro")
    try:
        known = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'").fetchone()
        version = db.execute("SELECT COALESCE(MAX(CAST(version AS INTEGER)), 0) FROM schema_migrations").fetchone()[0] if known else 0
        return {"schema": version}
    finally:
        db.close()


def main(command, *args):
    if command == "schema":
        return schema(*args)
    if command == "rotate":
        return rotate(*args)
    if command == "database":
        return database(*args)
    os.umask(0o077)  # what the backup commands write holds customer data
    if command == "snapshot":
        return snapshot(args[0], args[1], args[2:])
    if command == "check":
        return check(args[0])
    if command == "fingerprint":
        return fingerprint(args[0], args[2:], json.loads(args[1]))
    if command == "swap":
        return swap(args[0], args[1], args[2:])
    sys.exit("unknown command %r" % command)


if __name__ == "__main__":
    try:
        print(json.dumps(main(*sys.argv[1:])))
    except (OSError, shutil.Error, sqlite3.Error) as e:
        sys.exit("%s: %s" % (type(e).__name__, e))

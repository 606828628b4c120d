"""Runs ON the counter (Debian's /usr/bin/python3, standard library only), for the floor and the peers:

    /usr/bin/python3 -c "$(cat counter_snapshot.py)" ROOT STAGING

Takes a consistent copy of ROOT/var/lib/smartcounter (each *.db through SQLite's online
backup API, so the copy is consistent while the app writes; journals skipped), archives it
as STAGING/backup.tar.gz (paths relative to ROOT, like `counterops` backups) and prints
{"archive": ..., "sha256": ...}. STAGING is replaced if it exists.
"""
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import tarfile
import urllib.parse

DATA = "var/lib/smartcounter"
root, staging = sys.argv[1], sys.argv[2]
os.umask(0o077)  # customer data
shutil.rmtree(staging, ignore_errors=True)
os.makedirs(staging)
tree = os.path.join(staging, "tree")


def copy(src, dst):
    if not src.endswith(".db"):
        shutil.copy2(src, dst)
        return
    source = sqlite3.connect("file:%s?mode=rw" % urllib.parse.quote(src), uri=True, timeout=30)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


shutil.copytree(os.path.join(root, DATA), os.path.join(tree, DATA), copy_function=copy,
                ignore=lambda d, names: [n for n in names if n.endswith(("-journal", "-wal", "-shm"))])
archive = os.path.join(staging, "backup.tar.gz")
with tarfile.open(archive, "w:gz") as tar:
    tar.add(os.path.join(tree, DATA), arcname=DATA)
shutil.rmtree(tree)
digest = hashlib.sha256()
with open(archive, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
print(json.dumps({"archive": archive, "sha256": digest.hexdigest()}))

"""Where things are on a smart counter: the one place that knows its file layout.

Every path is relative to the counter's root (``/`` on a real counter; a
directory per counter in the simulated fleet): pass it through
``tasks.ssh.remote_path(device.root, ...)``. The programs that run on the
counter (tasks/oncounter) cannot import this module; a test keeps their
copy of CUSTOMER_TABLES equal to this one.
"""

from __future__ import annotations

COUNTER_PYTHON = "/usr/bin/python3"  # the counter's system python: standard library only, no sqlite3 command

RELEASES_DIR = "opt/smartcounter/releases"  # one directory per unpacked release, named after its version
CURRENT_LINK = "opt/smartcounter/current"  # symlink to the running release (releases/<version>)
CTL = f"{CURRENT_LINK}/bin/ctl"  # the running release's service control: start|stop|restart|status
DATA_DIR = "var/lib/smartcounter"  # what a backup holds
DATABASE = f"{DATA_DIR}/counter.db"  # the customer tables live here
LOG_DIR = "var/log/smartcounter"
TMP_DIR = "tmp"  # uploads, backup staging and restores land here

CUSTOMER_TABLES = ("customers", "cards", "transactions")  # customer data: row-counted, fingerprinted, never lost

"""Prefect flows: they orchestrate, the tasks do the work.

Whatever imports a flow (the CLI, a worker's flow-run process, a deployment's pull) writes its
files private to its user from then on: backups, the store, reports, scratch restores (umask 077).
"""

from inventory.paths import private_files

private_files()

"""The bench's per-counter work as a pyinfra deploy (see bench/README.md).

    pyinfra INVENTORY.py bench/pyinfra/deploy.py --parallel PARALLEL --no-wait -y

bench/run.py writes INVENTORY.py from the fleet's inventory.yaml: one host per counter
(ssh_hostname/ssh_port/ssh_user/ssh_key, ssh_known_hosts_file = the fleet's known_hosts,
ssh_strict_host_key_checking = "yes") with its data: counter_root, http_port, version,
http_host, package, package_sha256, backup_dir, bench_dir. `--no-wait` lets each counter run its own
pipeline (like Ansible's `free` strategy and the other ways) instead of waiting for
every counter at every operation.
"""

import hashlib
import shlex
from pathlib import Path

from pyinfra import host
from pyinfra.operations import files, python, server

d = host.data
bench = Path(d.bench_dir)
root = d.counter_root
staging = f"{root}/tmp/bench-backup"
archive = f"{staging}/backup.tar.gz"
local_backup = f"{d.backup_dir}/{host.name}.tar.gz"
remote_package = f"{root}/tmp/{Path(d.package).name}"
release_dir = f"{root}/opt/smartcounter/releases/{d.version}"
current_link = f"{root}/opt/smartcounter/current"


def q(*argv):
    return " ".join(shlex.quote(str(a)) for a in argv)


def check_backup_sha256(remote_path, local_path):
    """sha256 of the downloaded backup, here and on the counter, must agree."""
    ok, output = host.run_shell_command(q("sha256sum", "--", remote_path))
    if not ok:
        raise RuntimeError(f"sha256sum on the counter failed: {output.stderr}")
    remote = output.stdout.split()[0]
    with open(local_path, "rb") as f:
        local = hashlib.file_digest(f, "sha256").hexdigest()
    if local != remote:
        raise RuntimeError(f"backup sha256 here {local} differs from the counter's {remote}")


server.shell(
    name="Snapshot the data directory (SQLite online backup) as a tar.gz on the counter",
    commands=[q("/usr/bin/python3", "-c", (bench / "counter_snapshot.py").read_text(), root, staging)],
)
files.get(name="Download the backup", src=archive, dest=local_backup, add_deploy_dir=False, force=True)
python.call(name="Check the backup's sha256 on both ends", function=check_backup_sha256,
            remote_path=archive, local_path=local_backup)
server.shell(name="Remove the staging directory", commands=[q("rm", "-rf", "--", staging)])

files.put(name="Upload the package", src=d.package, dest=remote_package, mode="644")
server.shell(
    name="Verify the package's sha256 on the counter",
    commands=[q("sh", "-c", '[ "$(sha256sum < "$2" | cut -d " " -f 1)" = "$1" ]', "sh", d.package_sha256, remote_package)],
)
server.shell(
    name="Unpack the release",
    commands=[q("sh", "-c", (bench / "scripts" / "unpack.sh").read_text(), "sh", release_dir, remote_package, d.version)],
)
server.shell(name="Migrate the data", commands=[q(f"{release_dir}/bin/migrate", "--root", root)])
server.shell(
    name="Switch current to the new release",
    commands=[q("sh", "-c", (bench / "scripts" / "switch.sh").read_text(), "sh", current_link, f"releases/{d.version}")],
)
server.shell(name="Restart the service", commands=[q(f"{current_link}/bin/ctl", "restart")])

business_test = (bench / "business_test.py").read_text()
server.shell(
    name="Wait until /health says ok on the new version",
    commands=[q("/usr/bin/python3", "-c", business_test, "health", d.http_host, d.http_port, d.version)],
)
server.shell(
    name="Business test (card opening, activation, transfer, account change)",
    commands=[q("/usr/bin/python3", "-c", business_test, "business", d.http_host, d.http_port)],
)
server.shell(name="Remove the uploaded package", commands=[q("rm", "-f", "--", remote_package)])

# sh -c "$(cat unpack.sh)" sh RELEASE_DIR PACKAGE VERSION  (the playbook's "unpack release" step)
set -eu
tmp=$(mktemp -d "$(dirname "$1")/.unpack.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$2" -C "$tmp" --no-same-owner
found=$(cat "$tmp/VERSION")
if [ "$found" != "$3" ]; then
  echo "$2 holds release $found, expected $3" >&2
  exit 1
fi
chmod 755 "$tmp"
rm -rf "$1"
mv -T "$tmp" "$1"

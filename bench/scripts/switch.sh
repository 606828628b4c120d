# sh -c "$(cat switch.sh)" sh CURRENT_LINK releases/VERSION  (the playbook's "switch current release" step)
set -eu
if [ ! -f "$(dirname "$1")/$2/VERSION" ]; then
  echo "no release at $(dirname "$1")/$2; current left as it is" >&2
  exit 1
fi
ln -sfn -- "$2" "$1.tmp"
mv -T -- "$1.tmp" "$1"

#!/usr/bin/env bash
# A writing tool interrupted the hard ways (issue 28): its output must be the previous file or the complete new
# one, never a short one, and no temporary file may be left behind.
#
#   interrupted_write.sh sigint <folder> <file> <delay s>... -- <program> <args>...
#       For each delay: <folder>/<file> holds "previous"; the program runs and gets SIGINT after the delay. The
#       file must then be "previous" (interrupted) or complete (the program exited 0 before the signal).
#   interrupted_write.sh full <file>... -- <program> <args>...
#       In a private mount namespace, a 1 MiB tmpfs is mounted on a fresh folder and filled; each <file> there
#       holds "previous"; the program (whose arguments name @DIR@ for the folder) must exit non-zero and leave
#       every <file> as it was. Needs root or unprivileged user namespaces: otherwise exits 77 (skipped).
# Exit status: 0 pass, 1 fail, 77 skipped.
set -u
fail() { echo "FAIL: $*"; exit 1; }
no_partials() {
  local left
  left=$(find "$1" -maxdepth 1 -name '*.partial-*' | head -3)
  [[ -z "$left" ]] || fail "temporary files left: $left"
}

mode=$1; shift
if [[ $mode == sigint ]]; then
  dir=$1 file=$2; shift 2
  delays=()
  while [[ $1 != -- ]]; do delays+=("$1"); shift; done
  shift
  mkdir -p "$dir"
  for delay in "${delays[@]}"; do
    printf previous > "$dir/$file"
    # timeout runs the tool in the foreground (a background job of a script would ignore SIGINT) and sends
    # SIGINT after the delay; --preserve-status: death by the signal reads 130.
    timeout --preserve-status -s INT "$delay" "$@" > "$dir/log" 2>&1
    status=$?
    content=$(head -c 8 "$dir/$file")
    echo "delay $delay s: exit status $status, file $(stat -c %s "$dir/$file") bytes"
    if [[ $status -eq 0 ]]; then
      [[ $content != previous ]] || fail "exit 0 but the file was not replaced"
    else
      [[ $status -eq 130 ]] || { cat "$dir/log"; fail "expected death by SIGINT (130), got $status"; }
      [[ $content == previous && $(stat -c %s "$dir/$file") -eq 8 ]] || fail "interrupted, and the previous file changed"
    fi
    no_partials "$dir"
  done
  echo PASS
  exit 0
fi

if [[ $mode == full ]]; then
  files=()
  while [[ $1 != -- ]]; do files+=("$1"); shift; done
  shift
  if [[ ${INSIDE_NAMESPACE:-} != 1 ]]; then
    flags=(-m)
    [[ $(id -u) -eq 0 ]] || flags=(-r -m)
    if ! unshare "${flags[@]}" true 2>/dev/null; then
      echo "SKIP: cannot make a mount namespace here (unshare ${flags[*]} failed): the full-disk case needs root or user namespaces"
      exit 77
    fi
    INSIDE_NAMESPACE=1 exec unshare "${flags[@]}" "$0" full "${files[@]}" -- "$@"
  fi
  dir=$(mktemp -d)
  if ! mount -t tmpfs -o size=1m tmpfs "$dir" 2>/dev/null; then
    echo "SKIP: cannot mount a tmpfs in the namespace"
    exit 77
  fi
  for f in "${files[@]}"; do mkdir -p "$(dirname "$dir/$f")"; printf previous > "$dir/$f"; done
  dd if=/dev/zero of="$dir/filler" bs=4k 2>/dev/null  # until ENOSPC
  args=()
  for a in "$@"; do args+=("${a//@DIR@/$dir}"); done
  "${args[@]}"
  status=$?
  echo "exit status $status on a full tmpfs"
  [[ $status -ne 0 ]] || fail "the tool exited 0 on a full disk"
  for f in "${files[@]}"; do
    [[ $(cat "$dir/$f") == previous ]] || fail "$f changed: $(stat -c %s "$dir/$f") bytes"
    no_partials "$(dirname "$dir/$f")"
  done
  umount "$dir"
  rmdir "$dir"
  echo PASS
  exit 0
fi
fail "unknown mode $mode"
